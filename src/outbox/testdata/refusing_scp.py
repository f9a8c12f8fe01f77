"""A Storage SCP that says no, for the outbox tests.

usage: refusing_scp.py PORT MODE
  status   accepts every storage SOP class, answers each C-STORE with 0xA900
           (dataset does not match SOP class): a permanent refusal
  context  accepts only CT Image Storage (answers success, stores nothing), so
           the presentation context of any other SOP class is rejected
  slow     accepts every storage SOP class and takes 5 s to answer (success):
           longer than the tests' DIMSE timeout
"""
import sys
import time

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage

port, mode = int(sys.argv[1]), sys.argv[2]
ae = AE(ae_title="REFUSER")
if mode == "status":
    ae.supported_contexts = AllStoragePresentationContexts
    status = 0xA900
elif mode == "context":
    ae.add_supported_context(CTImageStorage)
    status = 0x0000
elif mode == "slow":
    ae.supported_contexts = AllStoragePresentationContexts
    status = 0x0000
else:
    sys.exit(f"unknown mode {mode}")


def on_store(event):
    if mode == "slow":
        time.sleep(5)
    return status


ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])
