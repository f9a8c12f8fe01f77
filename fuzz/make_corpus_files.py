"""Seed corpora for the file-reading fuzz targets (dicom_file, config, npy,
part10_roundtrip). Everything is generated here, small and deterministic;
fuzz/make_corpus.py makes the pdu_stream seeds.

Needs pydicom, numpy, pyjpegls and Pillow (all in integration-tests'
requirements). Run from anywhere: python3 fuzz/make_corpus_files.py
"""
import io
import os
import random
import shutil
import struct

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom import uid as U

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
ROOT = os.path.dirname(HERE)
CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
SIDE = 8


def out_dir(target):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    return d


def pixels(side=SIDE, dtype=np.int16):
    # A ramp from air to bone, so HU and padding paths both see values.
    a = np.linspace(-1024, 1200, side * side).reshape(side, side)
    return a.astype(dtype)


def ct_dataset(n=1, z=0.0, side=SIDE):
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1484.7.{n}"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1484.7"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1484.7.1"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.1484.7.2"
    ds.Modality = "CT"
    ds.PatientName = "Fuzz^Seed"
    ds.PatientID = "F1"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = "Thorax 3mm"
    ds.InstanceNumber = n
    ds.SliceThickness = "3"
    ds.ImagePositionPatient = [-100, -100, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = side
    ds.Columns = side
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.PixelPaddingValue = -2000
    ds.PixelData = pixels(side).tobytes()
    return ds


def part10(ds, ts, source_ae=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1484.1"
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encapsulated(ds, ts, frames):
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return part10(ds, ts)


def dicom_file_seeds():
    seeds = {}
    seeds["ct_explicit_le.dcm"] = part10(ct_dataset(), U.ExplicitVRLittleEndian)
    seeds["ct_implicit_le.dcm"] = part10(ct_dataset(2, 3.0), U.ImplicitVRLittleEndian)
    seeds["ct_deflated.dcm"] = part10(ct_dataset(3, 6.0), U.DeflatedExplicitVRLittleEndian)
    # 18-character Source AE: the meta group open_dicom repairs.
    seeds["ct_long_source_ae.dcm"] = part10(ct_dataset(4, 9.0), U.ExplicitVRLittleEndian, "A" * 18)
    ds = ct_dataset(5, 12.0)
    ds.compress(U.RLELossless, pixels().astype(np.int16))
    seeds["ct_rle.dcm"] = part10(ds, U.RLELossless)
    ds = ct_dataset(6, 15.0)
    ds.compress(U.JPEGLSLossless, pixels().astype(np.int16))
    seeds["ct_jpegls.dcm"] = part10(ds, U.JPEGLSLossless)
    try:
        from PIL import Image, features
        img = Image.fromarray(((pixels().astype(np.int32) + 1024) // 10).clip(0, 255).astype(np.uint8))
        b = io.BytesIO()
        img.save(b, format="JPEG", quality=90)
        ds = ct_dataset(7, 18.0)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        del ds.PixelPaddingValue
        ds.RescaleSlope, ds.RescaleIntercept = "10", "-1024"
        seeds["ct_jpeg_baseline.dcm"] = encapsulated(ds, U.JPEGBaseline8Bit, [b.getvalue()])
        if features.check("jpg_2000"):
            b = io.BytesIO()
            img.save(b, format="JPEG2000", irreversible=False)
            ds = ct_dataset(8, 21.0)
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            del ds.PixelPaddingValue
            seeds["ct_j2k.dcm"] = encapsulated(ds, U.JPEG2000Lossless, [b.getvalue()])
    except ImportError:
        pass
    # Enhanced CT: two frames, geometry in functional groups.
    ds = ct_dataset(9)
    ds.SOPClassUID = ENHANCED_CT
    for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
              "RescaleIntercept", "RescaleSlope", "InstanceNumber"):
        del ds[k]
    ds.NumberOfFrames = 2
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [0.7, 0.7]
    pm.SliceThickness = "3"
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([po])
    pv = Dataset()
    pv.RescaleIntercept = "0"
    pv.RescaleSlope = "1"
    shared.PixelValueTransformationSequence = Sequence([pv])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for f in range(2):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [-100, -100, 3.0 * f]
        item.PlanePositionSequence = Sequence([pp])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.concatenate([pixels(), pixels()]).tobytes()
    seeds["enhanced_ct_2_frames.dcm"] = part10(ds, U.ExplicitVRLittleEndian)
    # A bare meta group without the preamble, which some writers produce.
    seeds["ct_no_preamble.dcm"] = seeds["ct_explicit_le.dcm"][128:]
    seeds["not_dicom.txt"] = b"# notes\n" * 20
    return seeds


def config_seeds():
    with open(os.path.join(ROOT, "config", "node.yaml"), "rb") as f:
        node = f.read()
    minimal = b"node:\n  ae_title: BIOMARKER\n  data_dir: data\n"
    flow = (b"node: {ae_title: FUZZ, data_dir: d, max_pdu: 16384, allowed_callers: [{ae_title: CT1, host: 10.0.0.1}]}\n"
            b"http: {listen: '0.0.0.0:8080', token: secret}\n"
            b"models: {m: {card: m.yaml, max_concurrency: 2}}\n"
            b"destinations: {p: {ae_title: PACS, host: h, port: 104, tls: {ca: ca.pem, server_name: pacs.local}}}\n"
            b"routes:\n"
            b"  - name: r\n    model: m\n    send_to: [p]\n    slices: {mode: z_mm, z_mm: -12.5}\n"
            b"    match:\n      any:\n        - {keyword: PatientAge, present: true}\n"
            b"        - {not: {derived: slice_spacing, range: {min: 0.5, max: 1}}}\n"
            b"        - {keyword: ImageType, one_of: [A, B]}\n        - {derived: instance_count, equals: 3}\n")
    bad = b"node:\n  ae_title: WAY_TOO_LONG_AE_TITLE\n  data_dir: d\nroutes:\n  - name: x\n    model: nope\n    match: {keyword: NotAKeyword, regex: '('}\n"
    return {"node.yaml": node, "minimal.yaml": minimal, "flow_and_operators.yaml": flow, "invalid.yaml": bad}


def npy_bytes(arr, version=(1, 0)):
    b = io.BytesIO()
    np.lib.format.write_array(b, arr, version=version)
    return b.getvalue()


def npy_seeds():
    return {
        "f4_2x3.npy": npy_bytes(np.arange(6, dtype="<f4").reshape(2, 3)),
        "f8_1d.npy": npy_bytes(np.linspace(0, 1, 5)),
        "u1_3d.npy": npy_bytes(np.arange(8, dtype=np.uint8).reshape(2, 2, 2)),
        "b1.npy": npy_bytes(np.array([True, False, True])),
        "i2_v2.npy": npy_bytes(np.arange(4, dtype="<i2"), version=(2, 0)),
        "i8_scalar.npy": npy_bytes(np.array(7, dtype="<i8")),
        "i4_empty.npy": npy_bytes(np.zeros((0, 3), dtype="<i4")),
    }


def part10_roundtrip_seeds():
    # Structured input (arbitrary's Unstructured): any bytes are an input;
    # a few lengths and patterns give the fuzzer somewhere to start.
    rng = random.Random(1484)
    seeds = {}
    for n in (16, 64, 256, 1024, 4096):
        seeds[f"random_{n}"] = bytes(rng.randrange(256) for _ in range(n))
    seeds["patient_name_utf8"] = b"\x00\x05" + "Müller^Zoë=山田^太郎".encode() + b"\x00" * 64
    return seeds


def write(target, seeds, keep=()):
    d = out_dir(target)
    for name in os.listdir(d):
        if name not in seeds and not name.startswith(("crash-", "oom-", "timeout-", "regress-")) and name not in keep:
            os.remove(os.path.join(d, name))
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def main():
    write("dicom_file", dicom_file_seeds())
    write("config", config_seeds())
    write("npy", npy_seeds())
    write("part10_roundtrip", part10_roundtrip_seeds())


if __name__ == "__main__":
    main()
