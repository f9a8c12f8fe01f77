//! Association negotiation (PS3.8 7.1, 9.3.2-9.3.4) as a pure function:
//! an A-ASSOCIATE-RQ plus our policy gives an A-ASSOCIATE-AC or -RJ.

use std::net::IpAddr;

use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, AssociationRQ, PresentationContextResult,
    PresentationContextResultReason, UserVariableItem,
};

use crate::config::AllowedCaller;
use crate::dicom::{
    is_accepted_transfer_syntax, is_storage_sop_class, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, VERIFICATION,
};

/// PS3.7 A.2.1: the only application context name.
pub const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";

/// What the listener knows when a request arrives.
#[derive(Debug, Clone)]
pub struct Policy<'a> {
    pub ae_title: &'a str,
    pub allowed_callers: &'a [AllowedCaller],
    pub max_pdu: u32,
    pub peer: IpAddr,
}

/// Why we refused before looking at the request's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// max_associations reached.
    TooManyAssociations,
    /// Free disk below the watermark.
    LowDisk,
}

/// An accepted presentation context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

#[derive(Debug, Clone)]
pub struct Accepted {
    pub ac: AssociationAC,
    pub contexts: Vec<AcceptedContext>,
    /// The peer's Maximum Length Received; 0 means unlimited (PS3.8 D.1).
    pub peer_max_pdu: u32,
}

pub fn reject_overload(why: Overload) -> AssociationRJ {
    let reason = match why {
        Overload::TooManyAssociations => AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        Overload::LowDisk => AssociationRJServiceProviderPresentationReason::TemporaryCongestion,
    };
    AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(reason),
    }
}

fn permanent(reason: AssociationRJServiceUserReason) -> AssociationRJ {
    AssociationRJ {
        result: AssociationRJResult::Permanent,
        source: AssociationRJSource::ServiceUser(reason),
    }
}

pub fn negotiate(rq: &AssociationRQ, policy: &Policy) -> Result<Accepted, AssociationRJ> {
    // PS3.8 9.3.2: only bit 0 (version 1) is tested.
    if rq.protocol_version & 1 == 0 {
        return Err(AssociationRJ {
            result: AssociationRJResult::Permanent,
            source: AssociationRJSource::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
        });
    }
    if rq.application_context_name.trim_end_matches('\0') != APPLICATION_CONTEXT {
        return Err(permanent(
            AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
        ));
    }
    if rq.called_ae_title.trim() != policy.ae_title.trim() {
        return Err(permanent(AssociationRJServiceUserReason::CalledAETitleNotRecognized));
    }
    let calling = rq.calling_ae_title.trim();
    let caller_ok = policy.allowed_callers.is_empty()
        || policy
            .allowed_callers
            .iter()
            .any(|c| c.ae_title.trim() == calling && c.host.is_none_or(|h| h == policy.peer));
    if !caller_ok {
        return Err(permanent(AssociationRJServiceUserReason::CallingAETitleNotRecognized));
    }

    let mut results = Vec::with_capacity(rq.presentation_contexts.len());
    let mut contexts = Vec::new();
    for pc in &rq.presentation_contexts {
        let abstract_syntax = pc.abstract_syntax.trim_end_matches('\0');
        let known = abstract_syntax == VERIFICATION || is_storage_sop_class(abstract_syntax);
        let chosen = if abstract_syntax == VERIFICATION {
            // Verification carries no dataset; any standard uncompressed syntax will do.
            pc.transfer_syntaxes
                .iter()
                .map(|t| t.trim_end_matches('\0'))
                .find(|t| matches!(*t, "1.2.840.10008.1.2" | "1.2.840.10008.1.2.1"))
        } else {
            // The proposer's order: an SCU lists the syntax its data is
            // already in first, and choosing another forces it to transcode
            // (which DCMTK cannot do for most compressed syntaxes).
            pc.transfer_syntaxes
                .iter()
                .map(|t| t.trim_end_matches('\0'))
                .find(|t| is_accepted_transfer_syntax(t))
        };
        let (reason, ts) = match (known, chosen) {
            (false, _) => (PresentationContextResultReason::AbstractSyntaxNotSupported, None),
            (true, None) => (PresentationContextResultReason::TransferSyntaxesNotSupported, None),
            (true, Some(ts)) => {
                (PresentationContextResultReason::Acceptance, Some(ts))
            }
        };
        if let Some(ts) = ts {
            contexts.push(AcceptedContext {
                id: pc.id,
                abstract_syntax: abstract_syntax.to_owned(),
                transfer_syntax: ts.to_owned(),
            });
        }
        results.push(PresentationContextResult {
            id: pc.id,
            reason,
            // PS3.8 9.3.3.2: the field is not significant when rejected,
            // but must still be present; echo the first proposal.
            transfer_syntax: ts
                .map(str::to_owned)
                .or_else(|| pc.transfer_syntaxes.first().cloned())
                .unwrap_or_else(|| "1.2.840.10008.1.2".into()),
        });
    }

    let peer_max_pdu = rq
        .user_variables
        .iter()
        .find_map(|u| match u {
            UserVariableItem::MaxLength(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0);

    Ok(Accepted {
        ac: AssociationAC {
            protocol_version: 1,
            calling_ae_title: rq.calling_ae_title.clone(),
            called_ae_title: rq.called_ae_title.clone(),
            application_context_name: APPLICATION_CONTEXT.into(),
            presentation_contexts: results,
            user_variables: vec![
                UserVariableItem::MaxLength(policy.max_pdu),
                UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.into()),
                UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION.into()),
            ],
        },
        contexts,
        peer_max_pdu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;

    fn rq(called: &str, calling: &str, pcs: Vec<(u8, &str, Vec<&str>)>) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: calling.into(),
            called_ae_title: called.into(),
            application_context_name: APPLICATION_CONTEXT.into(),
            presentation_contexts: pcs
                .into_iter()
                .map(|(id, a, ts)| PresentationContextProposed {
                    id,
                    abstract_syntax: a.into(),
                    transfer_syntaxes: ts.into_iter().map(String::from).collect(),
                })
                .collect(),
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        }
    }

    fn policy(callers: &[AllowedCaller]) -> Policy<'_> {
        Policy {
            ae_title: "BIOMARKER",
            allowed_callers: callers,
            max_pdu: 65536,
            peer: "127.0.0.1".parse().unwrap(),
        }
    }

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    #[test]
    fn wrong_called_ae_is_reason_7() {
        let e = negotiate(&rq("OTHER", "SCU", vec![]), &policy(&[])).unwrap_err();
        assert_eq!(e.result, AssociationRJResult::Permanent);
        assert_eq!(
            e.source,
            AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::CalledAETitleNotRecognized)
        );
    }

    #[test]
    fn unknown_caller_and_wrong_host_are_reason_3() {
        let allowed = [AllowedCaller { ae_title: "CT1".into(), host: Some("10.0.0.1".parse().unwrap()) }];
        for calling in ["CT2", "CT1"] {
            let e = negotiate(&rq("BIOMARKER", calling, vec![]), &policy(&allowed)).unwrap_err();
            assert_eq!(
                e.source,
                AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::CallingAETitleNotRecognized),
                "{calling}"
            );
        }
    }

    #[test]
    fn contexts_take_the_proposers_first_supported_syntax_and_refusals_have_reasons() {
        let a = negotiate(
            &rq(
                "BIOMARKER",
                "SCU",
                vec![
                    (1, CT, vec!["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70"]),
                    (3, CT, vec!["1.2.840.10008.1.2.4.53"]),
                    (5, "1.2.840.10008.1.3.10", vec!["1.2.840.10008.1.2.1"]),
                    (7, VERIFICATION, vec!["1.2.840.10008.1.2"]),
                    (9, CT, vec!["1.2.840.10008.1.2.4.51"]),
                ],
            ),
            &policy(&[]),
        )
        .unwrap();
        let r = &a.ac.presentation_contexts;
        assert_eq!(r[0].reason, PresentationContextResultReason::Acceptance);
        assert_eq!(r[0].transfer_syntax, "1.2.840.10008.1.2.4.50");
        assert_eq!(r[1].reason, PresentationContextResultReason::TransferSyntaxesNotSupported);
        assert_eq!(r[2].reason, PresentationContextResultReason::AbstractSyntaxNotSupported);
        assert_eq!(r[3].reason, PresentationContextResultReason::Acceptance);
        // JPEG Extended (12-bit) is decoded by libjpeg-turbo: accepted.
        assert_eq!(r[4].reason, PresentationContextResultReason::Acceptance);
        assert_eq!(r[4].transfer_syntax, "1.2.840.10008.1.2.4.51");
        assert_eq!(a.contexts.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1, 7, 9]);
        assert_eq!(a.peer_max_pdu, 16384);
    }

    #[test]
    fn overload_is_transient() {
        assert_eq!(reject_overload(Overload::TooManyAssociations).result, AssociationRJResult::Transient);
    }
}
