#!/usr/bin/env python3
"""Packages tollgate.wasm as an OCI image (an OCI image layout directory), with no container engine.

    python3 tests/oci_image.py --wasm target/wasm32-wasip1/release/tollgate.wasm \\
        --out target/oci/tollgate --tag 0.1.0

The image is the "compat" variant of the Wasm image format that Istio's agent pulls for
`oci://` URLs (istio pkg/wasm/imagefetcher.go, after solo-io's spec-compat): an ordinary OCI image
whose only layer (application/vnd.oci.image.layer.v1.tar+gzip) is a tar holding one file,
`plugin.wasm`. The manifest carries the annotation `module.wasm.image/variant: compat`.

The layout written under --out:
    oci-layout                        {"imageLayoutVersion":"1.0.0"}
    index.json                        the manifest's descriptor, ref.name = --tag (other tags of an
                                      existing layout are kept; the same tag is replaced)
    blobs/sha256/<manifest digest>    application/vnd.oci.image.manifest.v1+json
    blobs/sha256/<config digest>      application/vnd.oci.image.config.v1+json
                                      (architecture "wasm", os "wasip1": not a runnable container)
    blobs/sha256/<layer digest>       the gzip'd tar

Reproducible: the same .wasm gives the same digests (tar entry mode 0644, uid/gid 0, mtime 0,
no user names, USTAR; gzip mtime 0 and no file name; JSON with sorted keys and no spaces). The
gzip bytes come from this Python's zlib: another zlib build may compress differently.

Push it with any OCI-layout-aware client, e.g.
    skopeo copy oci:target/oci/tollgate:0.1.0 docker://REGISTRY/tollgate:0.1.0
Istio's WasmPlugin `sha256` (and an EnvoyFilter's remote `sha256`) for an oci:// URL is the
*manifest* digest, printed on stdout ("manifest sha256:…"), not the digest of the .wasm.
Python standard library only.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
VARIANT_ANNOTATION = "module.wasm.image/variant"
REF_NAME = "org.opencontainers.image.ref.name"
WASM_MAGIC = b"\0asm"


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(wasm):
    """The uncompressed layer: one regular file plugin.wasm with fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(wasm)
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.type = tarfile.REGTYPE
        tar.addfile(info, io.BytesIO(wasm))
    return buf.getvalue()


def gzip_bytes(data):
    buf = io.BytesIO()
    # filename="" and mtime=0: no name and no time in the gzip header.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def build(wasm, tag, title="tollgate"):
    """The image's blobs for a .wasm: returns (blobs {digest: bytes}, manifest descriptor)."""
    if not wasm.startswith(WASM_MAGIC):
        raise ValueError("not a WebAssembly binary (no \\0asm magic)")
    tar = layer_tar(wasm)
    layer = gzip_bytes(tar)
    config = canonical_json({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
        "history": [{"created_by": "tests/oci_image.py (plugin.wasm)"}],
    })
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": sha256(config), "size": len(config)},
        "layers": [{
            "mediaType": LAYER_TYPE, "digest": sha256(layer), "size": len(layer),
            "annotations": {"org.opencontainers.image.title": "plugin.wasm"},
        }],
        "annotations": {
            VARIANT_ANNOTATION: "compat",
            "org.opencontainers.image.title": title,
            "org.opencontainers.image.version": tag,
        },
    })
    blobs = {sha256(b): b for b in (layer, config, manifest)}
    descriptor = {
        "mediaType": MANIFEST_TYPE, "digest": sha256(manifest), "size": len(manifest),
        "annotations": {REF_NAME: tag},
    }
    return blobs, descriptor


def _write_atomic(path, data):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_layout(out, blobs, descriptor):
    """Writes (or updates) an OCI image layout at `out`; returns the index it wrote."""
    blob_dir = os.path.join(out, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    for digest, data in blobs.items():
        _write_atomic(os.path.join(blob_dir, digest.split(":", 1)[1]), data)
    _write_atomic(os.path.join(out, "oci-layout"), canonical_json({"imageLayoutVersion": "1.0.0"}))
    manifests = []
    index_path = os.path.join(out, "index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path, "rb") as f:
                manifests = json.load(f).get("manifests", [])
        except (OSError, ValueError):
            manifests = []
    tag = descriptor["annotations"][REF_NAME]
    manifests = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) != tag]
    manifests.append(descriptor)
    manifests.sort(key=lambda m: (m.get("annotations") or {}).get(REF_NAME, ""))
    index = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": manifests}
    _write_atomic(index_path, canonical_json(index))
    return index


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wasm", required=True, help="the .wasm to package")
    ap.add_argument("--out", required=True, help="OCI image layout directory (created or updated)")
    ap.add_argument("--tag", required=True, help="the tag (index.json ref.name), e.g. 0.1.0")
    ap.add_argument("--title", default="tollgate", help="org.opencontainers.image.title")
    args = ap.parse_args(argv)
    with open(args.wasm, "rb") as f:
        wasm = f.read()
    try:
        blobs, descriptor = build(wasm, args.tag, args.title)
    except ValueError as err:
        sys.exit(f"oci_image: {args.wasm}: {err}")
    write_layout(args.out, blobs, descriptor)
    print(f"wrote {args.out} (tag {args.tag})")
    print(f"manifest {descriptor['digest']}  <- WasmPlugin sha256 for oci:// (without 'sha256:')")
    print(f"wasm     {sha256(wasm)}  ({len(wasm)} bytes)")


if __name__ == "__main__":
    main()
