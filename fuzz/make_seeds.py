#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/corpus/<target>/: small valid inputs of each
format (and a few near-misses) for libFuzzer to mutate. Run from anywhere; overwrites the seeds."""
import gzip
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, raw bytes), packed back to back."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(t[3] for t in tensors)


def f32(*v):
    return struct.pack("<%df" % len(v), *v)


# safetensors: every dtype, a zero-size dim, a 0-dim scalar, metadata, and a checkpoint.
put("safetensors", "empty", safetensors([]))
put("safetensors", "f32_2x3", safetensors([("w", "F32", [2, 3], f32(1, 2, 3, 4, 5, 6))]))
put("safetensors", "all_dtypes", safetensors([
    ("a", "F64", [2], struct.pack("<2d", 1.5, -2.0)),
    ("b", "F16", [2], struct.pack("<2H", 0x3C00, 0x7C00)),
    ("c", "BF16", [2], struct.pack("<2H", 0x3F80, 0x7FC0)),
    ("d", "I32", [1], struct.pack("<i", -7)),
    ("e", "I64", [1], struct.pack("<q", 1 << 40)),
    ("f", "U8", [3], b"\x00\x7f\xff"),
    ("g", "BOOL", [2], b"\x00\x01"),
], {"note": "seed", "unicode": "\u00e9\u4e2d"}))
put("safetensors", "zero_dim", safetensors([("z", "F32", [4, 0, 3], b""), ("s", "F32", [], f32(3.0))]))
put("safetensors", "checkpoint", safetensors([
    ("model.bias", "F32", [3], f32(0.1, 0.2, 0.3)),
    ("model.weight", "F32", [3, 2], f32(1, 2, 3, 4, 5, 6)),
], {"format": "mixprec-checkpoint-1", "step": "12", "epoch": "1", "rng.0": "0123456789abcdef" * 4,
    "scaler.scale": "65536", "scaler.growth_factor": "2", "scaler.backoff_factor": "0.5",
    "scaler.growth_interval": "2000", "scaler._growth_tracker": "7", "extra.best_loss": "0.125"}))

# IDX: ranks 1 and 3, a zero dim, gzip, and a truncated file.
labels = bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + bytes([0, 1, 2, 9, 4])
images = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + bytes(range(24))
put("idx", "labels_rank1", labels)
put("idx", "images_rank3", images)
put("idx", "zero_dim", bytes([0, 0, 8, 2]) + struct.pack(">2I", 0, 7))
put("idx", "images_rank3.gz", gzip.compress(images, mtime=0))
put("idx", "labels_rank1.gz", gzip.compress(labels, mtime=0))
put("idx", "truncated", images[:-5])

# Text: 4 parameter bytes (split fraction, batch, window, seed), then the corpus.
fortune = b"You will be fortunate.\n%\nA bird in the hand is worth two in the bush.\n%\n"
put("text", "fortune", bytes([25, 3, 15, 1]) + fortune)
put("text", "short", bytes([0, 0, 0, 0]) + b"ab")
put("text", "empty", bytes([200, 7, 63, 9]))
put("text", "binary", bytes([128, 1, 1, 2]) + bytes(range(256)))
put("text", "utf8", bytes([51, 2, 5, 3]) + "na\u00efve caf\u00e9 \u65e5\u672c\n".encode())
