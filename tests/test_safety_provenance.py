"""Provenance: EXIF/XMP tags, the local test CA, C2PA signing, validation against the test CA, tamper detection."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fluxrt.safety import provenance as pv

c2pa = pytest.importorskip("c2pa", reason="needs c2pa-python (safety extra)")
x509 = pytest.importorskip("cryptography.x509", reason="needs cryptography (safety extra)")


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ca")
    chain, key = pv.make_test_ca(folder)
    return pv.SignerFiles(chain, key), folder / "ca.pem"


def picture(seed: int = 0, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---------------------------------------------------------------- tampering helpers: new pixels, old manifest


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, out = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    return out


def png_with_chunks(chunks) -> bytes:
    body = b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def tamper_png(signed: bytes) -> bytes:
    """Same file, same C2PA chunk, but the image data re-encoded from pixels with one changed value."""
    arr = np.array(Image.open(io.BytesIO(signed)).convert("RGB"))
    arr[5, 7, 0] ^= 0x40
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    new_idat = b"".join(d for t, d in png_chunks(buf.getvalue()) if t == b"IDAT")
    chunks, done = [], False
    for t, d in png_chunks(signed):
        if t == b"IDAT":
            if not done:
                chunks.append((b"IDAT", new_idat))
                done = True
            continue
        chunks.append((t, d))
    return png_with_chunks(chunks)


def jpeg_app11_segments(data: bytes) -> bytes:
    """The APP11 (JUMBF, where C2PA lives) segments of a JPEG, concatenated with their markers."""
    pos, out = 2, b""
    while data[pos] == 0xFF and data[pos + 1] != 0xDA:  # until start of scan
        (n,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if data[pos + 1] == 0xEB:
            out += data[pos : pos + 2 + n]
        pos += 2 + n
    return out


def tamper_jpeg(signed: bytes) -> bytes:
    """The signed file's C2PA segments put in front of a re-encoded JPEG of slightly changed pixels."""
    arr = np.array(Image.open(io.BytesIO(signed)).convert("RGB"))
    arr[:8, :8] = 255 - arr[:8, :8]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    fresh = buf.getvalue()
    return fresh[:2] + jpeg_app11_segments(signed) + fresh[2:]


# ---------------------------------------------------------------- EXIF / XMP


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_exif_and_xmp_tags(fmt):
    data = pv.encode_with_metadata(picture(), fmt, model="flux.2-dev")
    meta = pv.read_metadata(data)
    assert meta == {"software": "AI generated;flux2", "make": "Black Forest Labs",
                    "digital_source_type": pv.DIGITAL_SOURCE_TYPE}  # fmt: skip
    assert Image.open(io.BytesIO(data)).format == fmt.upper()
    plain = pv.read_metadata(pv.encode_with_metadata(picture(), fmt, tags=False))
    assert plain == {"software": None, "make": None, "digital_source_type": None}


def test_png_metadata_is_lossless():
    img = picture(1)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(pv.encode_with_metadata(img)))), np.asarray(img))


# ---------------------------------------------------------------- test CA


def test_test_ca_certificates(ca):
    signer, root_path = ca
    certs = x509.load_pem_x509_certificates(signer.cert_chain.read_bytes())
    leaf, root = certs
    assert leaf.issuer == root.subject != leaf.subject  # not self-signed
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.EMAIL_PROTECTION in eku
    assert x509.load_pem_x509_certificate(root_path.read_bytes()) == root
    leaf.verify_directly_issued_by(root)


# ---------------------------------------------------------------- C2PA


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_signed_image_validates_against_test_ca(ca, fmt):
    signer, root = ca
    signed = pv.sign(picture(), fmt, pv.ManifestInfo(model="flux.2-dev"), signer)
    r = pv.verify(signed, trust_anchors=root)
    assert r["manifest_present"] and r["validation_state"] == "Trusted" and r["trusted"] and r["failures"] == []
    assert r["actions"] == ["c2pa.created"]
    assert r["digital_source_type"] == "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
    assert r["model"] == "flux.2-dev" and r["claim_generator"].startswith("fluxrt ")
    assert r["signer"] == "fluxrt test signer" and r["ingredients"] == []
    assert pv.read_metadata(signed)["software"] == "AI generated;flux2"  # tags written before signing survive
    # Without the test root the signature and hashes still check out, but the signer is not trusted.
    untrusted = pv.verify(signed)
    assert untrusted["validation_state"] == "Valid" and not untrusted["trusted"]
    assert "signingCredential.untrusted" in untrusted["failures"]


def test_edit_lists_references_as_ingredients(ca, tmp_path):
    signer, root = ca
    ref_file = tmp_path / "input.png"
    picture(5).save(ref_file)
    info = pv.ManifestInfo(model="flux.2-dev", ingredients=(ref_file, picture(6)))
    r = pv.verify(pv.sign(picture(), "png", info, signer), trust_anchors=root)
    assert r["trusted"] and r["ingredients"] == ["input.png", "reference-1"]


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_tampered_pixels_fail_validation(ca, fmt):
    signer, root = ca
    signed = pv.sign(picture(2), fmt, pv.ManifestInfo(model="flux.2-dev"), signer)
    tampered = (tamper_png if fmt == "png" else tamper_jpeg)(signed)
    assert tampered != signed
    r = pv.verify(tampered, trust_anchors=root)
    assert r["manifest_present"], "the manifest was carried over"
    assert r["validation_state"] == "Invalid" and not r["valid"]
    assert "assertion.dataHash.mismatch" in r["failures"]


def test_sign_existing_file_as_is(ca, tmp_path):
    signer, root = ca
    path = tmp_path / "out.png"
    path.write_bytes(pv.encode_with_metadata(picture(3), "png", "fluxrt-shapes"))
    signed = pv.sign(path, None, pv.ManifestInfo(model="fluxrt-shapes", title="out.png"), signer)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(signed))), np.asarray(picture(3)))
    assert pv.verify(signed, trust_anchors=root.read_text())["trusted"]


def test_unsigned_and_bad_inputs(ca, tmp_path):
    r = pv.verify(pv.encode_with_metadata(picture(), "png"))
    assert not r["manifest_present"] and r["validation_state"] is None and not r["valid"]
    with pytest.raises(FileNotFoundError, match="nowhere.pem"):
        pv.SignerFiles(tmp_path / "nowhere.pem", tmp_path / "nowhere.key")
    with pytest.raises(ValueError, match="webp"):
        pv.sign(picture(), "webp", pv.ManifestInfo(model="m"), ca[0])
