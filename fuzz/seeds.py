"""Write the seed corpus of every target (``python -m fuzz seed``): small, valid inputs.

Run once after a change of an input format; the files are kept in the repository. The images
are 8 x 8 synthetic chest radiographs (:mod:`tests.support.dicom_files`), so the whole corpus
stays small.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import zlib
from collections.abc import Iterable
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from fuzz import CORPUS_DIR
from fuzz.cstore import CONTEXTS, DX
from fuzz.dicom_header import SYNTAXES
from fuzz.hl7_ack import CONTROL_ID
from fuzz.http_request import BASIC, FULL_TOKEN, METRICS_TOKEN, STUDY
from tests.support import upper_layer
from tests.support.dicom_files import make_cr, make_dx, make_sc

__all__ = ["write_corpus"]


def _encode(ds: Dataset, syntax: str) -> bytes:
    """The data set (without File Meta Information) in ``syntax``."""
    buf = io.BytesIO()
    fp = DicomFileLike(buf)
    fp.is_little_endian = True
    fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    data = buf.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = packer.compress(data) + packer.flush()
    return data


def _images() -> dict[str, Dataset]:
    dx = make_dx(None, rows=8, cols=8, study_uid=STUDY)
    cr = make_cr(None, rows=8, cols=8, study_uid=STUDY)
    sc = make_sc(None, rows=8, cols=8, study_uid=STUDY, modality="DX", body_part="CHEST")
    rle = make_dx(None, rows=8, cols=8, study_uid=STUDY, seed=3)
    rle.compress(RLELossless, generate_instance_uid=False)
    for ds in (dx, cr, sc, rle):
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "PID4711"
    return {"dx": dx, "cr": cr, "sc": sc, "rle": rle}


def _part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _context_index(abstract: str, syntax: str) -> int:
    return next(n for n, (_, a, s) in enumerate(CONTEXTS) if a == abstract and s == syntax)


def cstore_seeds(images: dict[str, Dataset]) -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for name, syntax in (
        ("dx", ExplicitVRLittleEndian),
        ("dx", ImplicitVRLittleEndian),
        ("dx", DeflatedExplicitVRLittleEndian),
        ("cr", ExplicitVRLittleEndian),
        ("sc", ExplicitVRLittleEndian),
    ):
        ds = images[name]
        index = _context_index(str(ds.SOPClassUID), syntax)
        seeds[f"store-{name}-{syntax}"] = bytes([index << 1]) + _encode(ds, syntax)
    rle = images["rle"]
    index = _context_index(DX, RLELossless)
    seeds["store-dx-rle"] = bytes([index << 1]) + _encode(rle, ExplicitVRLittleEndian)
    dx = images["dx"]
    data = _encode(dx, ExplicitVRLittleEndian)
    command = upper_layer.c_store_rq(1, DX, str(dx.SOPInstanceUID))
    pdus = upper_layer.p_data(1, command, command=True) + upper_layer.p_data(1, data, command=False)
    seeds["raw-store-release"] = b"\x01" + pdus + upper_layer.release_rq()
    seeds["raw-store-fragmented"] = (
        b"\x01"
        + upper_layer.p_data(1, command, command=True, fragment=20)
        + upper_layer.p_data(1, data, command=False, fragment=300)
        + upper_layer.release_rq()
    )
    seeds["raw-store-cut"] = b"\x01" + pdus[: len(pdus) // 2]
    seeds["raw-abort"] = b"\x01" + bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])
    seeds["raw-release"] = b"\x01" + upper_layer.release_rq()
    return seeds


def stow_seeds(images: dict[str, Dataset]) -> dict[str, bytes]:
    boundary = b"d2r-fuzz-boundary"

    def body(parts: Iterable[tuple[bytes, bytes]], close: bool = True) -> bytes:
        out = b""
        for content_type, data in parts:
            header = b"Content-Type: " + content_type + b"\r\n" if content_type else b""
            out += b"--" + boundary + b"\r\n" + header + b"\r\n" + data + b"\r\n"
        return out + (b"--" + boundary + b"--\r\n" if close else b"")

    dx, cr, rle = (_part10(images[k]) for k in ("dx", "cr", "rle"))
    line = boundary + b"\n"
    return {
        "one-part": b"\x00" + line + body([(b"application/dicom", dx)]),
        "one-part-study-route-quoted": b"\x03" + line + body([(b"application/dicom", dx)]),
        "two-parts-chunked": b"\x04" + line + body([(b"application/dicom", dx), (b"", cr)]),
        "rle-and-text": b"\x00" + line + body([(b"application/dicom", rle), (b"text/plain", b"x")]),
        "truncated": b"\x00" + line + body([(b"application/dicom", dx)], close=False)[:900],
    }


def http_seeds() -> dict[str, bytes]:
    def get(path: str, *headers: str) -> bytes:
        lines = [f"GET {path} HTTP/1.1", "Host: node", *headers, "", ""]
        return "\r\n".join(lines).encode()

    bearer = f"Authorization: Bearer {FULL_TOKEN}"
    seeds = {
        "healthz": get("/healthz"),
        "readyz-keepalive": get("/readyz") + get("/healthz", "Connection: close"),
        "metrics-token": get("/metrics", f"Authorization: Bearer {METRICS_TOKEN}"),
        "metrics-anonymous": get("/metrics"),
        "index-token": get("/", bearer),
        "index-basic": get("/", f"Authorization: Basic {BASIC}"),
        "study-token": get(f"/studies/{STUDY}", bearer),
        "preview-token": get(f"/studies/{STUDY}/preview.png", bearer),
        "api-metrics-token": get("/api/studies", f"Authorization: Bearer {METRICS_TOKEN}"),
        "unknown-path": get("/../etc/passwd?x=1#y", bearer),
        "proxy-header": get("/", "X-Forwarded-User: admin"),
        "head-basic": get("/", f"Authorization: Basic {BASIC}").replace(b"GET", b"HEAD", 1),
    }
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--b--\r\n"
    post = (
        "POST /dicom-web/studies HTTP/1.1\r\nHost: node\r\n"
        f'{bearer}\r\nContent-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    seeds["stow-post"] = post + body
    chunked = (
        post.replace(f"Content-Length: {len(body)}".encode(), b"Transfer-Encoding: chunked")
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    seeds["stow-post-chunked"] = chunked
    seeds["post-metrics"] = b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
    return seeds


def header_seeds(images: dict[str, Dataset]) -> dict[str, bytes]:
    seeds = {}
    for name, syntax in (
        ("dx", ExplicitVRLittleEndian),
        ("dx", ImplicitVRLittleEndian),
        ("dx", DeflatedExplicitVRLittleEndian),
        ("cr", ExplicitVRLittleEndian),
        ("sc", ExplicitVRLittleEndian),
    ):
        seeds[f"{name}-{syntax}"] = bytes([SYNTAXES.index(syntax)]) + _encode(images[name], syntax)
    seeds["dx-rle"] = bytes([SYNTAXES.index(RLELossless)]) + _encode(
        images["rle"], ExplicitVRLittleEndian
    )
    return seeds


def hl7_seeds() -> dict[str, bytes]:
    msh = "MSH|^~\\&|RIS|HOSP|D2R|HOSP|20250101120000||ACK^R01^ACK|ACK0001|P|2.5.1"

    def ack(*segments: str) -> bytes:
        return b"\x0b" + "\r".join([msh, *segments]).encode() + b"\r\x1c\x0d"

    return {
        "aa": ack(f"MSA|AA|{CONTROL_ID}"),
        "ca": ack(f"MSA|CA|{CONTROL_ID}"),
        "ae-transient": ack(
            f"MSA|AE|{CONTROL_ID}|busy", "ERR||PID^1^3|207^Application internal error^HL70357|E"
        ),
        "ar-unknown-patient": ack(
            f"MSA|AR|{CONTROL_ID}|patient Doe PID4711 unknown",
            "ERR||PID^1^3|204^Unknown key identifier^HL70357|E||||patient PID4711 not found",
        ),
        "other-control-id": ack("MSA|AA|SOMETHING-ELSE"),
        "escaped-text": ack(f"MSA|AE|{CONTROL_ID}|a \\F\\ b \\X0D0A\\ c"),
        "no-msa": ack(),
        "two-frames": ack(f"MSA|AA|{CONTROL_ID}") + ack(f"MSA|AR|{CONTROL_ID}"),
    }


def destination_seeds() -> dict[str, bytes]:
    texts = [
        "PACS@10.0.0.5:104",
        "dicom://PACS@pacs.example.org:11112, tls://ARCHIVE@[::1]:2762",
        "dicom+tls://PACS@pacs:2762",
        "dicomweb+https://pacs.example.org/dicom-web?token_file=/run/secrets/token",
        "dicomweb+http://127.0.0.1:8042/dicom-web?basic_auth_file=/run/secrets/basic",
        "mllp://ris:2575,mllp+tls://[fe80::1]:2576",
        "fhir+https://fhir.example.org/fhir/R4/",
        "dicomweb+https://pacs.example.org/dicom-web?insecure=true",
    ]
    seeds = {f"{n}": b"\x00" + t.encode() for n, t in enumerate(texts)}
    seeds["tls-default"] = b"\x01PACS@10.0.0.5:104,mllp://ris:2575"
    return seeds


def write_corpus(root: Path = CORPUS_DIR) -> dict[str, int]:
    """Replace the seed corpus under ``root``; returns the number of seeds per target."""
    images = _images()
    corpora = {
        "cstore": cstore_seeds(images),
        "stow": stow_seeds(images),
        "http_request": http_seeds(),
        "dicom_header": header_seeds(images),
        "hl7_ack": hl7_seeds(),
        "destination": destination_seeds(),
    }
    for target, seeds in corpora.items():
        folder = root / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in seeds.items():
            digest = hashlib.sha1(data).hexdigest()[:12]  # noqa: S324 - a file name
            safe = "".join(c if c.isalnum() or c in "-." else "_" for c in name)
            (folder / f"{safe}-{digest}").write_bytes(data)
    return {target: len(seeds) for target, seeds in corpora.items()}
