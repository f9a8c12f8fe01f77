//! The labels CSV of `dataset export`: one key column, a value, an optional
//! unit, read strictly. A label that cannot be read is an error for the whole
//! file (it would silently train on less, or on the wrong numbers).

use std::collections::HashMap;
use std::fmt;

/// Which identifier a labels CSV keys its rows by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    AccessionNumber,
    StudyInstanceUid,
    SeriesInstanceUid,
}

impl KeyKind {
    pub const ALL: [KeyKind; 3] = [
        KeyKind::AccessionNumber,
        KeyKind::StudyInstanceUid,
        KeyKind::SeriesInstanceUid,
    ];

    /// The column name.
    pub fn column(self) -> &'static str {
        match self {
            KeyKind::AccessionNumber => "accession_number",
            KeyKind::StudyInstanceUid => "study_instance_uid",
            KeyKind::SeriesInstanceUid => "series_instance_uid",
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.column())
    }
}

/// One data row of the CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRow {
    /// Line number in the file (the header is line 1).
    pub line: usize,
    pub key: String,
    pub value: f64,
    /// The row's unit; `None` when the column is absent or the cell empty.
    pub unit: Option<String>,
}

/// A parsed labels CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    pub key: KeyKind,
    pub rows: Vec<LabelRow>,
}

/// Why a labels CSV is unusable. Lines are the file's (header = 1).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LabelsError {
    #[error("the file is empty")]
    Empty,
    #[error("line {line}: an unterminated quoted field")]
    Quote { line: usize },
    #[error("no key column: the header needs one of accession_number, study_instance_uid, series_instance_uid")]
    NoKey,
    #[error(
        "several key columns ({0}): keep exactly one of accession_number, study_instance_uid, series_instance_uid"
    )]
    SeveralKeys(String),
    #[error("no `value` column in the header")]
    NoValue,
    #[error("the header names column `{0}` twice")]
    DuplicateColumn(String),
    #[error("line {line}: {found} field(s), the header has {expected}")]
    Width { line: usize, found: usize, expected: usize },
    #[error("line {line}: empty {column}")]
    EmptyKey { line: usize, column: &'static str },
    #[error("line {line}: value `{value}` is not a finite number")]
    BadValue { line: usize, value: String },
    #[error("line {line}: {column} `{key}` is on line {first} already")]
    DuplicateKey {
        line: usize,
        first: usize,
        column: &'static str,
        key: String,
    },
    #[error("no data rows under the header")]
    NoRows,
}

/// A unit in the CSV that is not the task's.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("line {line}: unit `{found}` is not the task's unit `{expected}` ({meaning}); convert the values, or fix the unit column")]
pub struct UnitMismatch {
    pub line: usize,
    pub found: String,
    pub expected: String,
    pub meaning: String,
}

/// Split CSV text into records of fields (RFC 4180: `"` quotes, `""` inside
/// quotes, CRLF or LF). Returns each record with its starting line.
fn records(text: &str) -> Result<Vec<(usize, Vec<String>)>, LabelsError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let (mut line, mut start) = (1usize, 1usize);
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => fields.push(std::mem::take(&mut field)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                fields.push(std::mem::take(&mut field));
                out.push((start, std::mem::take(&mut fields)));
                line += 1;
                start = line;
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        return Err(LabelsError::Quote { line: start });
    }
    if !field.is_empty() || !fields.is_empty() {
        fields.push(field);
        out.push((start, fields));
    }
    // Blank lines carry nothing.
    out.retain(|(_, f)| !(f.len() == 1 && f[0].trim().is_empty()));
    Ok(out)
}

/// Parse a labels CSV. Column names are matched without case and
/// surrounding spaces; columns other than the key, `value` and `unit` are
/// ignored (and never copied anywhere).
pub fn parse(text: &str) -> Result<Labels, LabelsError> {
    let mut recs = records(text)?.into_iter();
    let (_, header) = recs.next().ok_or(LabelsError::Empty)?;
    let names: Vec<String> = header.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
    let mut seen = HashMap::new();
    for n in &names {
        if seen.insert(n.as_str(), ()).is_some() {
            return Err(LabelsError::DuplicateColumn(n.clone()));
        }
    }
    let col = |name: &str| names.iter().position(|n| n == name);
    let keys: Vec<(KeyKind, usize)> = KeyKind::ALL
        .into_iter()
        .filter_map(|k| Some((k, col(k.column())?)))
        .collect();
    let (key, key_col) = match keys[..] {
        [] => return Err(LabelsError::NoKey),
        [k] => k,
        _ => {
            let list = keys.iter().map(|(k, _)| k.column()).collect::<Vec<_>>().join(", ");
            return Err(LabelsError::SeveralKeys(list));
        }
    };
    let value_col = col("value").ok_or(LabelsError::NoValue)?;
    let unit_col = col("unit");
    let mut rows = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (line, fields) in recs {
        if fields.len() != names.len() {
            return Err(LabelsError::Width {
                line,
                found: fields.len(),
                expected: names.len(),
            });
        }
        let k = fields[key_col].trim().to_owned();
        if k.is_empty() {
            return Err(LabelsError::EmptyKey {
                line,
                column: key.column(),
            });
        }
        let raw = fields[value_col].trim();
        let value = raw
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| LabelsError::BadValue {
                line,
                value: raw.to_owned(),
            })?;
        if let Some(&first) = first_line.get(&k) {
            return Err(LabelsError::DuplicateKey {
                line,
                first,
                column: key.column(),
                key: k,
            });
        }
        first_line.insert(k.clone(), line);
        let unit = unit_col.map(|c| fields[c].trim().to_owned()).filter(|u| !u.is_empty());
        rows.push(LabelRow {
            line,
            key: k,
            value,
            unit,
        });
    }
    if rows.is_empty() {
        return Err(LabelsError::NoRows);
    }
    Ok(Labels { key, rows })
}

/// A unit spelling reduced to what tells units apart: case, spaces, UCUM's
/// annotation braces and a superscript two do not.
fn unit_key(u: &str) -> String {
    u.chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '{' | '}'))
        .map(|c| if c == '²' { '2' } else { c.to_ascii_lowercase() })
        .collect()
}

/// Every row's unit is the task's (`ucum`, or its `meaning` spelled out);
/// rows without a unit are taken to be in it. The first mismatch is the error.
pub fn check_units(labels: &Labels, ucum: &str, meaning: &str) -> Result<(), UnitMismatch> {
    let ok = [unit_key(ucum), unit_key(meaning)];
    for r in &labels.rows {
        if let Some(u) = &r.unit {
            if !ok.contains(&unit_key(u)) {
                return Err(UnitMismatch {
                    line: r.line,
                    found: u.clone(),
                    expected: ucum.to_owned(),
                    meaning: meaning.to_owned(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_key_a_value_and_a_unit_with_quotes_and_crlf() {
        let l =
            parse("\u{feff}Series_Instance_UID, value ,unit,note\r\n1.2.3,12.5,cm2,\"a, b\"\r\n\r\n\"1.2.4\",7,,x\n")
                .unwrap();
        assert_eq!(l.key, KeyKind::SeriesInstanceUid);
        assert_eq!(
            l.rows,
            vec![
                LabelRow {
                    line: 2,
                    key: "1.2.3".into(),
                    value: 12.5,
                    unit: Some("cm2".into())
                },
                LabelRow {
                    line: 4,
                    key: "1.2.4".into(),
                    value: 7.0,
                    unit: None
                },
            ]
        );
    }

    #[test]
    fn a_quoted_newline_stays_in_its_field_and_counts_lines() {
        let l = parse("accession_number,value,comment\nA1,1,\"two\nlines\"\nA2,2,x").unwrap();
        assert_eq!(l.key, KeyKind::AccessionNumber);
        assert_eq!((l.rows[1].line, l.rows[1].key.as_str()), (4, "A2"));
    }

    #[test]
    fn every_unusable_file_says_why() {
        let cases: [(&str, LabelsError); 10] = [
            ("", LabelsError::Empty),
            ("value,unit\n1,cm2\n", LabelsError::NoKey),
            (
                "study_instance_uid,series_instance_uid,value\n1,2,3\n",
                LabelsError::SeveralKeys("study_instance_uid, series_instance_uid".into()),
            ),
            ("study_instance_uid,unit\n1,cm2\n", LabelsError::NoValue),
            (
                "study_instance_uid,value,value\n1,2,3\n",
                LabelsError::DuplicateColumn("value".into()),
            ),
            (
                "study_instance_uid,value\n1,2,3\n",
                LabelsError::Width {
                    line: 2,
                    found: 3,
                    expected: 2,
                },
            ),
            (
                "study_instance_uid,value\n ,2\n",
                LabelsError::EmptyKey {
                    line: 2,
                    column: "study_instance_uid",
                },
            ),
            (
                "study_instance_uid,value\n1,2\n2,n/a\n",
                LabelsError::BadValue {
                    line: 3,
                    value: "n/a".into(),
                },
            ),
            (
                "study_instance_uid,value\n1,2\n1,3\n",
                LabelsError::DuplicateKey {
                    line: 3,
                    first: 2,
                    column: "study_instance_uid",
                    key: "1".into(),
                },
            ),
            ("study_instance_uid,value\n", LabelsError::NoRows),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text), Err(want), "{text:?}");
        }
        assert_eq!(parse("a,value\n\"open,1\n"), Err(LabelsError::Quote { line: 2 }));
        assert!(matches!(
            parse("series_instance_uid,value\n1,inf\n"),
            Err(LabelsError::BadValue { .. })
        ));
    }

    #[test]
    fn units_match_by_ucum_or_meaning_and_a_foreign_one_is_named() {
        let l = parse("series_instance_uid,value,unit\n1,1,cm2\n2,1,CM²\n3,1,square centimeter\n4,1,\n").unwrap();
        assert_eq!(check_units(&l, "cm2", "square centimeter"), Ok(()));
        let cac = parse("series_instance_uid,value,unit\n1,1,Agatston\n2,1,{Agatston}\n").unwrap();
        assert_eq!(check_units(&cac, "{Agatston}", "Agatston score"), Ok(()));
        let mm2 = parse("series_instance_uid,value,unit\n1,1,cm2\n2,100,mm2\n").unwrap();
        let e = check_units(&mm2, "cm2", "square centimeter").unwrap_err();
        assert_eq!((e.line, e.found.as_str()), (3, "mm2"));
        assert!(e.to_string().contains("`cm2`"), "{e}");
    }
}
