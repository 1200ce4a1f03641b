"""Provenance of saved outputs: EXIF/XMP tags that say "AI generated", and signed C2PA manifests.

Contract:
    encode_with_metadata(img, fmt, model) -> bytes    PNG/JPEG bytes with the reference's EXIF tags
        (Software = "AI generated;flux2", Make = "Black Forest Labs") and an XMP packet whose IPTC
        DigitalSourceType is trainedAlgorithmicMedia.
    read_metadata(path_or_bytes) -> dict              those tags as read back.
    make_test_ca(folder) -> (cert_chain_pem, key_pem) a local root CA and a leaf signing certificate, for tests
        and local use only: C2PA validators trust only CAs on their trust list.
    sign(image, fmt, manifest_info, signer) -> bytes  the image with an embedded, signed C2PA manifest:
        a `c2pa.actions` assertion whose `c2pa.created` action carries the IPTC digital source type
        trainedAlgorithmicMedia and the model as software agent; edits list their reference images as
        `inputTo` ingredients.
    verify(path_or_bytes, trust_anchors=None) -> dict manifest present, validation state, claim generator,
        actions, ingredients, failures.

Signing must be the last step: the manifest binds a hash of every other byte of the file, so the EXIF/XMP tags go
in first (`sign` does that when `manifest_info.metadata` is true) and any later change of the file, its pixels
included, makes validation fail. The C2PA part needs the `safety` extra (c2pa-python, cryptography).
"""

from __future__ import annotations

import datetime
import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

import fluxrt

AI_SOFTWARE = "AI generated;flux2"  # EXIF Software, as the reference writes it (FLUX2_REFERENCE.md 10.3)
AI_MAKE = "Black Forest Labs"  # EXIF Make, likewise
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
CLAIM_GENERATOR = "fluxrt"
_EXIF_MAKE, _EXIF_SOFTWARE = 0x010F, 0x0131
_XMP_KEY = "XML:com.adobe.xmp"  # PNG iTXt keyword for XMP
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg"}
_INSTALL_HINT = "C2PA needs the `safety` extra: pip install 'fluxrt[safety]' (c2pa-python, cryptography)"

ImageSource = str | Path | bytes | Image.Image


def _fmt(fmt: str) -> str:
    """'png' | 'jpeg' from 'PNG', 'jpg', 'image/jpeg', ..."""
    key = fmt.lower().removeprefix("image/").lstrip(".")
    if key not in _MIME:
        raise ValueError(f"unsupported image format {fmt!r}; provenance handles png and jpeg")
    return "jpeg" if key == "jpg" else key


def _c2pa():
    try:
        import c2pa
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return c2pa


# ---------------------------------------------------------------- EXIF / XMP


def xmp_packet(model: str | None = None) -> bytes:
    """An XMP packet declaring IPTC DigitalSourceType = trainedAlgorithmicMedia (and the creator tool)."""
    tool = f"{CLAIM_GENERATOR} {fluxrt.__version__}" + (f" ({model})" if model else "")
    tool = tool.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
        f'    Iptc4xmpExt:DigitalSourceType="{DIGITAL_SOURCE_TYPE}"\n'
        f'    xmp:CreatorTool="{tool}"/>\n'
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    ).encode()


def output_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[_EXIF_SOFTWARE] = AI_SOFTWARE
    exif[_EXIF_MAKE] = AI_MAKE
    return exif


def encode_with_metadata(img: Image.Image, fmt: str = "png", model: str | None = None, quality: int = 95,
                         tags: bool = True) -> bytes:  # fmt: skip
    """`img` encoded as PNG or JPEG with the EXIF tags and the XMP packet (`tags=False`: plain); `quality`: JPEG."""
    from PIL import PngImagePlugin

    fmt = _fmt(fmt)
    buf = io.BytesIO()
    extra = {"exif": output_exif()} if tags else {}
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if tags:
            info.add_itxt(_XMP_KEY, xmp_packet(model).decode("utf-8"))
        img.save(buf, "PNG", pnginfo=info, **extra)
    else:
        rgb = img.convert("RGB") if img.mode not in ("RGB", "L") else img
        if tags:
            extra["xmp"] = xmp_packet(model)
        rgb.save(buf, "JPEG", quality=quality, subsampling=0, **extra)
    return buf.getvalue()


def _read_bytes(src: str | Path | bytes) -> bytes:
    return bytes(src) if isinstance(src, (bytes, bytearray)) else Path(src).read_bytes()


def read_metadata(src: str | Path | bytes) -> dict:
    """{"software", "make", "digital_source_type"} as found in the file (None where absent)."""
    with Image.open(io.BytesIO(_read_bytes(src))) as im:
        exif = im.getexif()
        xmp = im.info.get("xmp") or im.info.get(_XMP_KEY) or b""
    xmp = xmp.encode("utf-8") if isinstance(xmp, str) else xmp
    m = re.search(rb'DigitalSourceType(?:="|>)([^"<]+)', xmp)
    return {
        "software": exif.get(_EXIF_SOFTWARE),
        "make": exif.get(_EXIF_MAKE),
        "digital_source_type": m.group(1).decode() if m else None,
    }


# ---------------------------------------------------------------- test certificates


def make_test_ca(folder: str | Path, days: int = 365) -> tuple[Path, Path]:
    """Write a P-256 root CA and a leaf signing certificate it issued into `folder`.

    Returns `(cert_chain_pem, key_pem)`: the chain is leaf then root, the key is the leaf's (PKCS#8).
    The root alone is also written to `folder/ca.pem`: pass it to `verify(..., trust_anchors=)`.
    What C2PA validators check (C2PA spec, certificate profile): the leaf is not self-signed and not a CA,
    has keyUsage digitalSignature and an extended key usage they accept (emailProtection here; documentSigning
    also works), and carries subject/authority key identifiers; the root has basicConstraints CA and keyCertSign.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fluxrt local test")])  # fmt: skip

    def usage(**on: bool) -> x509.KeyUsage:
        flags = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                 "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]  # fmt: skip
        return x509.KeyUsage(**{f: on.get(f, False) for f in flags})

    def cert(subject, issuer, key, signing_key, lifetime, extensions):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + lifetime))  # fmt: skip
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(signing_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = name("fluxrt test root CA")
    ca = cert(ca_name, ca_name, ca_key, ca_key, datetime.timedelta(days=days), [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (usage(key_cert_sign=True, crl_sign=True), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
    ])  # fmt: skip
    leaf = cert(name("fluxrt test signer"), ca_name, leaf_key, ca_key, datetime.timedelta(days=days), [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (usage(digital_signature=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False),
        (x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ])  # fmt: skip

    def pem(c):
        return c.public_bytes(serialization.Encoding.PEM)

    chain, key, root = folder / "chain.pem", folder / "signer.key", folder / "ca.pem"
    chain.write_bytes(pem(leaf) + pem(ca))
    root.write_bytes(pem(ca))
    key.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    key.chmod(0o600)
    return chain, key


# ---------------------------------------------------------------- C2PA


@dataclass(frozen=True)
class SignerFiles:
    """Where the signing material lives. `alg` must match the key (es256 for P-256, ps256 for RSA, ed25519)."""

    cert_chain: Path
    private_key: Path
    alg: str = "es256"
    tsa_url: str | None = None  # RFC 3161 time-stamp authority; None signs without a time stamp (offline)

    def __post_init__(self):
        for p in (self.cert_chain, self.private_key):
            if not Path(p).is_file():
                raise FileNotFoundError(f"C2PA signing file not found: {str(p)!r}")


@dataclass(frozen=True)
class ManifestInfo:
    """What the manifest declares. `ingredients`: reference images of an edit (paths, bytes or PIL images)."""

    model: str
    title: str | None = None
    ingredients: tuple[ImageSource, ...] = ()
    description: str | None = None
    metadata: bool = True  # PIL input: write the EXIF/XMP tags before signing


def _image_bytes(src: ImageSource, fmt: str | None) -> tuple[bytes, str]:
    """(bytes, 'png'|'jpeg') of an image given as a path, bytes or PIL image."""
    if isinstance(src, Image.Image):
        buf = io.BytesIO()
        src.save(buf, "PNG")
        return buf.getvalue(), "png"
    data = _read_bytes(src)
    if fmt is None:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
    return data, _fmt(fmt)


def manifest_definition(info: ManifestInfo, fmt: str) -> dict:
    action = {
        "action": "c2pa.created",
        "digitalSourceType": DIGITAL_SOURCE_TYPE,
        "softwareAgent": {"name": info.model},
        "description": info.description or f"Generated by the image model {info.model} with {CLAIM_GENERATOR}.",
    }
    return {
        "claim_generator_info": [{"name": CLAIM_GENERATOR, "version": fluxrt.__version__}],
        "title": info.title or f"output.{'jpg' if fmt == 'jpeg' else fmt}",
        "format": _MIME[fmt],
        "assertions": [{"label": "c2pa.actions", "data": {"actions": [action]}}],
    }


def _ingredient_title(src: ImageSource, i: int) -> str:
    return Path(src).name if isinstance(src, (str, Path)) else f"reference-{i}"


def sign(image: ImageSource, fmt: str | None, manifest_info: ManifestInfo, signer: SignerFiles) -> bytes:
    """The image's file bytes with an embedded C2PA manifest signed by `signer`.

    `image`: a PIL image (encoded as `fmt`, with the EXIF/XMP tags when `manifest_info.metadata`), or a path or
    encoded bytes, signed as they are (write the tags first with `encode_with_metadata`: re-encoding here would
    cost a JPEG a second lossy pass). `fmt`: 'png' | 'jpeg'; None takes it from the file (PIL input: png).
    """
    c2pa = _c2pa()
    if isinstance(image, Image.Image):
        fmt = _fmt(fmt or "png")
        data = encode_with_metadata(image, fmt, manifest_info.model, tags=manifest_info.metadata)
    else:
        data, fmt = _image_bytes(image, fmt)
    settings = {"builder": {"thumbnail": {"enabled": False}}, "verify": {"verify_after_sign": False}}
    builder = c2pa.Builder(manifest_definition(manifest_info, fmt), context=c2pa.Context.from_dict(settings))
    for i, ing in enumerate(manifest_info.ingredients):
        ing_bytes, ing_fmt = _image_bytes(ing, None)
        meta = {"title": _ingredient_title(ing, i), "relationship": "inputTo"}
        builder.add_ingredient(meta, _MIME[ing_fmt], io.BytesIO(ing_bytes))
    info = c2pa.C2paSignerInfo(signer.alg, Path(signer.cert_chain).read_bytes(), Path(signer.private_key).read_bytes(),
                               signer.tsa_url)  # fmt: skip
    out = io.BytesIO()
    with c2pa.Signer.from_info(info) as c2pa_signer:
        builder.sign(c2pa_signer, _MIME[fmt], io.BytesIO(data), out)
    return out.getvalue()


def signer_for(cert: str | Path, key: str | Path, model: str, references=()):
    """`sign(file_bytes, fmt) -> file_bytes` for `outputs.save_image`: a C2PA manifest declaring AI generation by
    `model`, with the reference images as ingredients, signed with the PEM chain `cert` and its `key`."""
    info = ManifestInfo(model, ingredients=tuple(references))
    signer = SignerFiles(Path(cert), Path(key))
    return lambda data, fmt: sign(data, fmt, info, signer)


def _pem_text(anchors: str | Path | bytes) -> str:
    if isinstance(anchors, bytes):
        return anchors.decode()
    if isinstance(anchors, str) and "-----BEGIN" in anchors:
        return anchors
    return Path(anchors).read_text()


def verify(src: str | Path | bytes, trust_anchors: str | Path | bytes | None = None) -> dict:
    """Read and validate the C2PA manifest of an image file.

    `trust_anchors`: extra root certificates (PEM text, bytes or a path) added to the SDK's trust list; with the
    root of `make_test_ca` a good signature validates as "Trusted". Without it, a test-CA signature reads as
    "Valid" (signature and hashes fine) with the failure code `signingCredential.untrusted`.
    Keys: manifest_present, validation_state ("Trusted" | "Valid" | "Invalid" | None), valid, trusted, failures
    (codes), claim_generator, actions, digital_source_type, model, ingredients (titles), signer (common name).
    """
    c2pa = _c2pa()
    data = _read_bytes(src)
    settings = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
    if trust_anchors is not None:
        settings["trust"] = {"user_anchors": _pem_text(trust_anchors)}
    empty = {"manifest_present": False, "validation_state": None, "valid": False, "trusted": False, "failures": [],
             "claim_generator": None, "actions": [], "digital_source_type": None, "model": None, "ingredients": [],
             "signer": None}  # fmt: skip
    try:
        reader = c2pa.Reader(None, io.BytesIO(data), context=c2pa.Context.from_dict(settings))
    except c2pa.C2paError as e:
        if "ManifestNotFound" in type(e).__name__ or "ManifestNotFound" in str(e):
            return empty
        raise
    with reader:
        store = reader.get_active_manifest() or {}
        state = reader.get_validation_state()
        results = reader.get_validation_results() or {}
    failures = [f["code"] for f in (results.get("activeManifest") or {}).get("failure", [])]
    actions = [a for asrt in store.get("assertions", []) if asrt.get("label", "").startswith("c2pa.actions")
               for a in asrt.get("data", {}).get("actions", [])]  # fmt: skip
    created = next((a for a in actions if a.get("action") == "c2pa.created"), {})
    gen = (store.get("claim_generator_info") or [{}])[0]
    return {
        **empty,
        "manifest_present": True,
        "validation_state": state,
        "valid": state in ("Valid", "Trusted"),
        "trusted": state == "Trusted",
        "failures": failures,
        "claim_generator": f"{gen.get('name', '')} {gen.get('version', '')}".strip() or None,
        "actions": [a.get("action") for a in actions],
        "digital_source_type": created.get("digitalSourceType"),
        "model": (created.get("softwareAgent") or {}).get("name"),
        "ingredients": [i.get("title") for i in store.get("ingredients", [])],
        "signer": (store.get("signature_info") or {}).get("common_name"),
    }
