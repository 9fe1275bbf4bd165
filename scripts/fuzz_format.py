"""Fuzz the .scn decoder: every damaged, foreign or hostile file must be a clean FormatError.

    python scripts/fuzz_format.py                      # 20,000 cases -> docs/results/fuzz.json
    python scripts/fuzz_format.py --cases 500 --seed 1 --out /tmp/fuzz

Cases come from a seeded mutator over real .scn files (small SmallCNN and ResNet models with
mixed bit depths, dead channels, masked inputs, float and fixed-bit layers). Besides random
bytes, truncations, bit flips and spliced chunks (which the SHA-256 checksum catches), most
mutations are re-signed with a valid checksum, so that what is tested is the decoder's own
checks: header fields set to absurd values (huge or negative shapes, bit depths above 16,
wrong types, missing keys, other formats and versions, deep nesting), tensors with the wrong
dtype, length or values, and a damaged safetensors table.

Each case goes through every entry point that reads a file (`format.parse`, `read_header`,
`file_stats`, `load`), in this process, under a per-case time limit (SIGALRM) and an address
space limit; a case whose peak memory grows by more than --max-growth-mb counts as a huge
allocation. A case is fine when it loads or raises FormatError; anything else is a crash.
"""

from __future__ import annotations

import argparse
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import torch

from scn import format as fmt
from scn.errors import FormatError
from scn.report import write_benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the mutators live with the tests that use them
from fuzz_mutators import MUTATORS, WEIGHTS, base_files  # noqa: E402

OUTCOMES = ("ok", "format_error", "crash", "hang", "huge_allocation")


# ---------------------------------------------------------------------------------------------
# Running one case


class Hang(Exception):
    """A case ran past its time limit."""


def _alarm(signum, frame):
    raise Hang()


def run_case(raw: bytes, path: Path, time_limit: float = 5.0) -> tuple[str, str]:
    """(outcome, detail): ok (loads), format_error (every entry point that failed raised a
    FormatError), crash (another exception), hang (past `time_limit` seconds)."""
    path.write_bytes(raw)  # a scratch file, not a result: no atomic write needed
    outcome, detail = "ok", ""
    steps = {"parse": lambda: fmt.parse(raw, "case"), "read_header": lambda: fmt.read_header(path),
             "file_stats": lambda: fmt.file_stats(path), "load": lambda: fmt.load(path)}
    for where, step in steps.items():
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, time_limit)
        try:
            step()
        except FormatError:
            outcome = "format_error" if outcome == "ok" else outcome
        except Hang:
            return "hang", f"{where}: past {time_limit:g} s"
        except Exception as exc:  # noqa: BLE001 (the point: any other exception is a crash)
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            return "crash", (f"{where}: {type(exc).__name__}: {str(exc)[:300]} "
                             f"({Path(frame.filename).name}:{frame.lineno})")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return outcome, detail


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def limit_memory(extra_gb: float) -> None:
    """Cap this process's address space at its current size plus `extra_gb`: a huge
    allocation then fails (and is reported as a crash) instead of exhausting the machine."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * resource.getpagesize()
    cap = current + int(extra_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))


def cases(n: int, seed: int, bases: dict[str, bytes]):
    """`n` (category, base name, bytes) cases from a seeded generator."""
    rng = random.Random(seed)
    names, weights = list(MUTATORS), [WEIGHTS[m] for m in MUTATORS]
    for _ in range(n):
        category = rng.choices(names, weights)[0]
        base = rng.choice(sorted(bases))
        yield category, base, MUTATORS[category](rng, bases[base])


def fuzz(n: int, seed: int, time_limit: float, max_growth_mb: float, workdir: Path,
         progress: bool = False) -> dict:
    bases = base_files()
    path = workdir / "case.scn"
    counts: dict[str, Counter] = defaultdict(Counter)
    failures: list[dict] = []
    start = time.perf_counter()
    baseline, max_case_s, slowest = peak_rss_mb(), 0.0, None  # the process with its base files
    for i, (category, base, raw) in enumerate(cases(n, seed, bases)):
        before = peak_rss_mb()
        t0 = time.perf_counter()
        outcome, detail = run_case(raw, path, time_limit)
        if time.perf_counter() - t0 > max_case_s:
            max_case_s, slowest = time.perf_counter() - t0, {"case": i, "category": category, "base": base}
        if outcome in ("ok", "format_error") and peak_rss_mb() - before > max_growth_mb:
            outcome, detail = "huge_allocation", f"peak memory grew {peak_rss_mb() - before:.0f} MB"
        counts[category][outcome] += 1
        if outcome not in ("ok", "format_error"):
            failures.append({"case": i, "category": category, "base": base, "outcome": outcome,
                             "detail": detail})
        if progress and (i + 1) % 1000 == 0:
            print(f"{i + 1} cases, {len(failures)} failures, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
    total = Counter()
    for c in counts.values():
        total.update(c)
    return {
        "cases": n, "crashes": total["crash"], "hangs": total["hang"],
        "huge_allocations": total["huge_allocation"], "seed": seed,
        "time_limit_s": time_limit, "runtime_s": round(time.perf_counter() - start, 1),
        # The process's peak memory above its baseline over every case (a high-water mark, so
        # it also counts what the first cases import), and the slowest case.
        "max_peak_mib": round(peak_rss_mb() - baseline, 1), "max_case_s": round(max_case_s, 3),
        "slowest_case": slowest,
        "results": [{"category": c, "cases": sum(counts[c].values()),
                     **{o: counts[c][o] for o in OUTCOMES}} for c in MUTATORS if counts[c]],
        "failures": failures[:50],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=5.0, help="seconds per case")
    parser.add_argument("--max-growth-mb", type=float, default=512,
                        help="peak memory growth in one case that counts as a huge allocation")
    parser.add_argument("--memory-cap-gb", type=float, default=4,
                        help="address space allowed beyond what the process uses at the start")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    limit_memory(args.memory_cap_gb)
    with tempfile.TemporaryDirectory() as tmp:
        outcome = fuzz(args.cases, args.seed, args.time_limit, args.max_growth_mb, Path(tmp),
                       progress=True)
    counts = {k: v for k, v in outcome.items() if k != "results"}
    write_benchmark(args.out / "fuzz.json", "scripts/fuzz_format.py",
                    sys.argv[1:] if argv is None else argv, outcome["results"], **counts)
    print(f"{outcome['cases']} cases in {outcome['runtime_s']} s: {outcome['crashes']} crashes, "
          f"{outcome['hangs']} hangs, {outcome['huge_allocations']} huge allocations")
    for r in outcome["results"]:
        print(f"  {r['category']:>18}: {r['cases']:>5} cases  " +
              "  ".join(f"{o} {r[o]}" for o in OUTCOMES))
    for f in outcome["failures"][:10]:
        print(f"  case {f['case']} ({f['category']}, {f['base']}): {f['outcome']}: {f['detail']}")
    return 1 if outcome["crashes"] or outcome["hangs"] or outcome["huge_allocations"] else 0


if __name__ == "__main__":
    sys.exit(main())
