"""Is ONNX Runtime worth it for embedding on CPU? The bundled all-MiniLM-L6-v2, torch against ORT.

    pip install onnxruntime onnx onnxscript      # for this benchmark only; paser does not need them
    python bench/embedding_onnx.py --alpaca ../shared/data/alpaca_5000.json --n 1000

First it asks sentence-transformers for its own ONNX backend (``backend="onnx"``) and prints what
it says (that backend exports through optimum-onnx). Then, in one process on the same texts:
paser's embedder (sentence-transformers on torch, batch 64) against the same transformer exported
with ``torch.onnx.export`` and run by ONNX Runtime with the same tokenizer, length-sorted batches
of 64, mean pooling and normalisation. Prints texts/s of each, their ratio, and the smallest
cosine between the two embeddings of a text (they must be the same embedding).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def onnx_backend_status(model_path: str) -> str:
    from sentence_transformers import SentenceTransformer

    try:
        SentenceTransformer(model_path, backend="onnx", device="cpu")
    except Exception as err:  # the message is the finding
        return f"unavailable: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return "available"


def ort_embedder(st_model, folder: Path):
    """A function texts -> unit embeddings that runs ``st_model``'s transformer in ONNX Runtime."""
    import onnxruntime as ort
    import torch

    transformer = st_model[0].auto_model.eval()
    tokenizer = st_model.tokenizer
    sample = tokenizer(["an example", "a longer example sentence"], padding=True, return_tensors="pt")
    path = folder / "model.onnx"
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "hidden": {0: "batch", 1: "seq"}}

    class Hidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    torch.onnx.export(Hidden(transformer), (sample["input_ids"], sample["attention_mask"]), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["hidden"], dynamic_axes=axes,
                      dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    max_len = st_model.max_seq_length

    def encode(texts: list[str], batch_size: int = 64) -> np.ndarray:
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), transformer.config.hidden_size), dtype=np.float32)
        for lo in range(0, len(texts), batch_size):
            part = order[lo:lo + batch_size]
            enc = tokenizer([texts[i] for i in part], padding=True, truncation=True, max_length=max_len,
                            return_tensors="np")
            mask = enc["attention_mask"].astype(np.int64)
            hidden = session.run(None, {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": mask})[0]
            pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
            out[part] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out

    return encode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alpaca", required=True)
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    from paser.data.pools import load_pool
    from paser.selection.embedding import SentenceEmbedder, default_model_path, instruction_texts

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    texts = instruction_texts(load_pool(args.alpaca).records[:args.n])
    print(f"sentence-transformers' ONNX backend: {onnx_backend_status(default_model_path())}", flush=True)
    embedder = SentenceEmbedder(device="cpu")
    embedder.encode(texts[:64])  # loaded and warm
    start = time.perf_counter()
    reference = embedder.encode(texts)
    torch_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        encode = ort_embedder(embedder._load(), Path(tmp))
        encode(texts[:64])
        start = time.perf_counter()
        got = encode(texts)
        ort_s = time.perf_counter() - start
    cosine = np.sum(reference * got, axis=1)
    print(f"{len(texts)} Alpaca instructions, batch 64:")
    print(f"  torch (paser's embedder): {torch_s:6.1f} s  {len(texts) / torch_s:6.1f} texts/s")
    print(f"  ONNX Runtime:             {ort_s:6.1f} s  {len(texts) / ort_s:6.1f} texts/s")
    print(f"  ORT / torch throughput: {torch_s / ort_s:.2f}; smallest cosine between the two: {cosine.min():.6f}")


if __name__ == "__main__":
    main()
