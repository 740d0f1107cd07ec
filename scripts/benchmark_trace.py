"""Benchmark: wall time and peak memory of tracing a model's static features, as predict does.

Every case runs in a fresh Python process that imports the project found at ``--root`` (the
checkout by default; give another worktree to measure older code), sets torch's threads and
calls ``irene.predictors.static.trace_static(model, [(batch_size, seq_len)])``, the function
behind ``stage=predict``, ``stage=whatif`` and serving. The child reports the seconds of the
trace itself (building the model and tracing it; imports excluded) and of the whole process,
the CPU seconds of both (less sensitive than wall time to other work on a shared machine) and
its peak resident memory
(``ru_maxrss`` of ``RUSAGE_SELF``; the parent's ``RUSAGE_CHILDREN`` when the child died). A
child runs under an address-space limit (``--max-gib``, like ``ulimit -v``) and a wall-clock
timeout, so a case that would need more than the machine has fails instead of swapping; the
failure is recorded with the last line of its stderr. Run from the project root:

    python scripts/benchmark_trace.py --repeats 3
    git worktree add /tmp/trace_before <commit>
    python scripts/benchmark_trace.py --root /tmp/trace_before --repeats 1

The 7B case traces a Llama ``config.json`` written into a temporary folder (hidden 4096,
32 layers, 32 heads, intermediate 11008, vocabulary 32000: Llama-2-7B's dimensions).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
}

# (label, model or "llama-7b", batch_size, seq_len)
CASES = [
    ("gpt2 8x128", "gpt2", 8, 128),
    ("gpt2 64x1024", "gpt2", 64, 1024),
    ("bert-large 8x128", "bert-large-uncased", 8, 128),
    ("llama 7B config.json 8x128", "llama-7b", 8, 128),
]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[2]))
from irene.predictors.static import trace_static
import irene.measure.trace  # transformers' model classes: imported before the clock starts
t1, c1 = time.perf_counter(), time.process_time()
trees = trace_static(sys.argv[3], [(int(sys.argv[4]), int(sys.argv[5]))])
t2, c2 = time.perf_counter(), time.process_time()
root = trees[0]["frontend_tree"]
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"trace_s": t2 - t1, "trace_cpu_s": c2 - c1, "total_s": t2 - t0,
                  "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_rss_mib": usage.ru_maxrss / 1024,
                  "root_mflops": root["flops"], "root_mem_mib": root["mem_bytes"]}))
"""


def _limit_memory(max_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    return apply


def run_case(root: Path, model: str, batch_size: int, seq_len: int, threads: int,
             max_gib: float, timeout_s: float) -> dict:
    """One fresh child process tracing one case; its report, or how it failed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, "-c", CHILD, str(root), str(threads), model, str(batch_size),
               str(seq_len)]
    try:
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout_s,
                              preexec_fn=_limit_memory(int(max_gib * 2**30)), check=False)
    except subprocess.TimeoutExpired:  # the child was killed and waited for
        error = f"timed out after {timeout_s:.0f} s"
    else:
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        error = f"exit {done.returncode}: {lines[-1] if lines else '(no message)'}"
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    # ru_maxrss of the children is a maximum over all of them: exact when it grew
    peak = after.ru_maxrss / 1024 if after.ru_maxrss > before.ru_maxrss else None
    return {"error": error, "cpu_s": round(cpu_s, 1), "peak_rss_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="project checkout to import")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the child")
    parser.add_argument("--max-gib", type=float, default=12.0, help="address-space limit")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--cases", nargs="*", help="labels to run (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "llama-7b" / "config.json"
        config.parent.mkdir()
        config.write_text(json.dumps(LLAMA_7B))
        for label, model, batch_size, seq_len in CASES:
            if args.cases and label not in args.cases:
                continue
            name = str(config) if model == "llama-7b" else model
            runs = [run_case(args.root.resolve(), name, batch_size, seq_len, args.threads,
                             args.max_gib, args.timeout_s) for _ in range(args.repeats)]
            good = [r for r in runs if "error" not in r]
            row: dict = {"case": label, "runs": len(runs), "ok": len(good)}
            if good:
                for key in ("trace_s", "trace_cpu_s", "total_s", "cpu_s", "peak_rss_mib"):
                    row[f"median_{key}"] = round(statistics.median(r[key] for r in good), 2)
                row["root_mflops"] = good[0]["root_mflops"]
            errors = [r for r in runs if "error" in r]
            if errors:
                row["error"] = errors[0]["error"]
                row["error_cpu_s"] = errors[0]["cpu_s"]
                row["error_peak_rss_mib"] = errors[0]["peak_rss_mib"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
