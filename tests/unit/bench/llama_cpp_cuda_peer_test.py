#!/usr/bin/env python3
"""Tests of the GPU benchmark's llama.cpp side (docs/gpu-bench.md):

* bench/llama_cpp_cuda_peer.py parses llama-bench -o json and
  llama-batched-bench --output-format jsonl as llama.cpp 0.3.36 (the
  llama-cpp-python sdist's vendor/llama.cpp) prints them: the samples in
  tools/llama-bench/README.md and tools/batched-bench/README.md (a CUDA run),
  and real output of that version's CPU build on the tiny synthetic model
  (tests/data/llama_cpp/*_cpu_tiny.*);
* picks llama.cpp's best configuration and repetition;
* runs both tools with the intended flags (fake binaries record argv);
* tools/gpu_bench_table.py computes ratios and rates;
* scripts/bench-gpu.sh drives everything end to end (fake nvidia-smi and
  binaries: no GPU here);
* llama.cpp (llama-cpp-python's CPU build) loads the synthetic GGUF and
  decodes (skipped without llama_cpp or KVGATE_MAKE_SYNTHETIC_GGUF).

Run: python3 tests/unit/bench/llama_cpp_cuda_peer_test.py (ctest: llama_cpp_cuda_peer_test).
"""
import copy
import ctypes
import importlib.util
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import unittest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DATA = os.path.join(ROOT, "tests", "data", "llama_cpp")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


peer = _load("llama_cpp_cuda_peer", os.path.join(ROOT, "bench", "llama_cpp_cuda_peer.py"))
table = _load("gpu_bench_table", os.path.join(ROOT, "tools", "gpu_bench_table.py"))


def _read(name):
    return _slurp(os.path.join(DATA, name))


def _slurp(path):
    with open(path) as fh:
        return fh.read()


class LlamaBenchJson(unittest.TestCase):
    def test_readme_cuda_sample(self):
        recs = peer.parse_llama_bench_json(_read("llama_bench_readme.json"))
        self.assertEqual(len(recs), 2)
        pp = peer.best_llama_bench(recs, 512, 0, 0)
        # Best repetition, not the mean: max(samples_ts) of the pp512 test.
        self.assertAlmostEqual(pp["tokens_per_s"], 7237.21)
        self.assertAlmostEqual(pp["mean_tokens_per_s"], 7100.002165)
        self.assertEqual(pp["reps"], 5)
        self.assertEqual(pp["flash_attn"], -1)
        self.assertEqual(pp["n_ubatch"], 512)
        tg = peer.best_llama_bench(recs, 0, 128, 0)
        self.assertAlmostEqual(tg["tokens_per_s"], 120.178)
        self.assertIsNone(peer.best_llama_bench(recs, 4096, 0, 0))
        self.assertIsNone(peer.best_llama_bench(recs, 0, 128, 512))  # other depth

    def test_real_cpu_output_of_this_version(self):
        path = os.path.join(DATA, "llama_bench_cpu_tiny.json")
        recs = peer.parse_llama_bench_json(_read("llama_bench_cpu_tiny.json"))
        # -p 64 -n 16 -d 0,32 -fa 0,1 -r 2 on the tiny synthetic model.
        self.assertEqual(len(recs), 8, path)
        self.assertEqual({r["flash_attn"] for r in recs}, {0, 1})
        self.assertEqual({r["n_depth"] for r in recs}, {0, 32})
        for r in recs:
            self.assertEqual(len(r["samples_ts"]), 2)
            n = r["n_prompt"] + r["n_gen"]
            for ns, ts in zip(r["samples_ns"], r["samples_ts"]):
                self.assertAlmostEqual(ts, 1e9 * n / ns, delta=1e-3 * ts)
        pp = peer.best_llama_bench(recs, 64, 0, 0)
        want = max(max(r["samples_ts"]) for r in recs
                   if (r["n_prompt"], r["n_gen"], r["n_depth"]) == (64, 0, 0))
        self.assertEqual(pp["tokens_per_s"], want)
        self.assertIn(pp["flash_attn"], (0, 1))
        self.assertIsNotNone(peer.best_llama_bench(recs, 0, 16, 32))

    def test_best_over_configurations(self):
        base = peer.parse_llama_bench_json(_read("llama_bench_readme.json"))[0]
        recs = []
        for fa, ub, top in ((0, 512, 100.0), (1, 512, 300.0), (1, 2048, 200.0)):
            r = copy.deepcopy(base)
            r.update(flash_attn=fa, n_ubatch=ub, samples_ts=[top - 10, top], samples_ns=[2, 1])
            recs.append(r)
        deep = copy.deepcopy(base)  # faster, but at depth 512: not a pp512 from empty
        deep.update(n_depth=512, samples_ts=[999.0], samples_ns=[1])
        recs.append(deep)
        best = peer.best_llama_bench(peer.parse_llama_bench_json(json.dumps(recs)), 512, 0, 0)
        self.assertEqual((best["tokens_per_s"], best["flash_attn"], best["n_ubatch"]), (300.0, 1, 512))

    def test_bad_output_is_a_parse_error(self):
        good = json.loads(_read("llama_bench_readme.json"))
        cases = {
            "truncated": _read("llama_bench_readme.json")[:-20],
            "not a list": json.dumps(good[0]),
            "empty": "[]",
        }
        for field, value in (("avg_ts", None), ("n_prompt", "512"), ("flash_attn", True),
                             ("samples_ts", [1.0]), ("samples_ns", [])):
            bad = copy.deepcopy(good)
            if value is None:
                del bad[0][field]
            else:
                bad[0][field] = value
            cases[f"{field}={value!r}"] = json.dumps(bad)
        zero = copy.deepcopy(good)
        zero[0]["samples_ts"][2] = 0
        cases["zero sample"] = json.dumps(zero)
        for what, text in cases.items():
            with self.subTest(what):
                with self.assertRaises(peer.ParseError):
                    peer.parse_llama_bench_json(text)
        with self.assertRaisesRegex(peer.ParseError, "avg_ts"):
            bad = copy.deepcopy(good)
            del bad[1]["avg_ts"]
            peer.parse_llama_bench_json(json.dumps(bad))


class BatchedBenchJsonl(unittest.TestCase):
    def test_readme_sample_among_log_lines(self):
        text = "main: n_kv_max = 2048\n" + _read("batched_bench_readme.jsonl") + \
            "\nllama_perf_context_print: load time = 1 ms\n{\"other\": 1}\n"
        rows = peer.parse_batched_bench_jsonl(text)
        self.assertEqual([r["pl"] for r in rows], [1, 2])
        b1 = peer.best_batched(rows, 1, 128, 128)
        self.assertAlmostEqual(b1["tokens_per_s"], 36.532974)
        b2 = peer.best_batched(rows, 2, 128, 128)
        self.assertAlmostEqual(b2["tokens_per_s"], 23.050371)
        self.assertIsNone(peer.best_batched(rows, 64, 128, 128))

    def test_real_cpu_output_of_this_version(self):
        rows = peer.parse_batched_bench_jsonl(_read("batched_bench_cpu_tiny.txt"))
        # -npp 32 -ntg 8 -npl 1,4
        self.assertEqual(sorted(r["pl"] for r in rows), [1, 4])
        for r in rows:
            self.assertAlmostEqual(r["speed_tg"], r["pl"] * r["tg"] / r["t_tg"], delta=0.01 * r["speed_tg"])
        self.assertIsNotNone(peer.best_batched(rows, 4, 32, 8))

    def test_sentinel_row_dropped(self):
        # -npl 1,4,1: the trailing 1 only guards against a lost last row.
        line = json.loads(_read("batched_bench_readme.jsonl").splitlines()[0])
        rows = [dict(line, pl=1, speed_tg=10.0), dict(line, pl=4, speed_tg=30.0),
                dict(line, pl=1, speed_tg=99.0)]
        kept = peer.first_rows_per_batch(rows)
        self.assertEqual([(r["pl"], r["speed_tg"]) for r in kept], [(1, 10.0), (4, 30.0)])

    def test_errors(self):
        with self.assertRaisesRegex(peer.ParseError, "no result rows"):
            peer.parse_batched_bench_jsonl("main: nothing\n")
        with self.assertRaisesRegex(peer.ParseError, "speed_tg"):
            peer.parse_batched_bench_jsonl('{"pp": 1, "tg": 1, "pl": 1, "n_kv": 2, "flash_attn": 0, '
                                           '"t_pp": 1, "speed_pp": 1, "t_tg": 1, "speed_tg": "x"}')
        with self.assertRaisesRegex(peer.ParseError, "not JSON"):
            peer.parse_batched_bench_jsonl('{"speed_tg": 1,,}')


# A fake llama-bench / llama-batched-bench: records argv, prints records in
# the real format with the values the flags ask for.
FAKE_BENCH = r'''#!/usr/bin/env python3
import json, os, sys
a = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as fh:
    fh.write(json.dumps([os.path.basename(sys.argv[0])] + a) + "\n")
def get(flag, default):
    return a[a.index(flag) + 1] if flag in a else default
base = json.load(open(os.environ["FAKE_TEMPLATE"]))[0]
if os.path.basename(sys.argv[0]) == "llama-bench":
    out = []
    for fa in get("-fa", "0").split(","):
        for ub in get("-ub", "512").split(","):
            for p in [int(x) for x in get("-p", "512").split(",") if int(x) > 0]:
                r = dict(base, n_prompt=p, n_gen=0, n_depth=int(get("-d", "0")), flash_attn=int(fa),
                         n_ubatch=int(ub), samples_ns=[1, 1], samples_ts=[1.0, 1000.0 * p + 10 * int(fa) + int(ub) / 1000])
                out.append(r)
            for g in [int(x) for x in get("-n", "128").split(",") if int(x) > 0]:
                out.append(dict(base, n_prompt=0, n_gen=g, n_depth=int(get("-d", "0")), flash_attn=int(fa),
                                n_ubatch=int(ub), samples_ns=[1], samples_ts=[50.0 + int(fa)]))
    print(json.dumps(out, indent=2))
else:
    fa = 1 if get("-fa", "off") == "on" else 0
    print("main: log line")
    for pl in get("-npl", "1").split(","):
        pl = int(pl)
        print(json.dumps({"n_kv_max": int(get("-c", "0")), "n_batch": 2048, "n_ubatch": 512, "flash_attn": fa,
              "pp": int(get("-npp", "0")), "tg": int(get("-ntg", "0")), "pl": pl, "n_kv": 1, "t_pp": 1.0,
              "speed_pp": 1.0, "t_tg": 1.0, "speed_tg": 40.0 * pl + fa}), file=sys.stderr)
'''


def _exe(path, text):
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


class PeerMain(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kvgate_peer_test_")
        self.bin = os.path.join(self.dir, "bin")
        os.mkdir(self.bin)
        for name in ("llama-bench", "llama-batched-bench"):
            _exe(os.path.join(self.bin, name), FAKE_BENCH)
        self.model = os.path.join(self.dir, "m.gguf")
        with open(self.model, "wb") as fh:
            fh.write(b"GGUF")
        self.log = os.path.join(self.dir, "argv.log")
        os.environ["FAKE_LOG"] = self.log
        os.environ["FAKE_TEMPLATE"] = os.path.join(DATA, "llama_bench_readme.json")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def calls(self):
        with open(self.log) as fh:
            return [json.loads(line) for line in fh]

    def test_flags_and_best_picks(self):
        out = os.path.join(self.dir, "peer.json")
        stdout = io.StringIO()
        old = sys.stdout
        sys.stdout = stdout
        try:
            rc = peer.main(["--bin-dir", self.bin, "--model", self.model, "--reps", "2",
                            "--out", out])
        finally:
            sys.stdout = old
        self.assertEqual(rc, 0)
        res = json.loads(_slurp(out))
        self.assertEqual(json.loads(stdout.getvalue()), res)
        calls = self.calls()
        pp, tg = calls[0], calls[1]
        self.assertEqual(pp[0], "llama-bench")
        for flag, val in (("-m", self.model), ("-ngl", "99"), ("-fa", "0,1"), ("-r", "2"),
                          ("-o", "json"), ("-p", "512,4096"), ("-n", "0"), ("-ub", "512,2048"),
                          ("-b", "4096")):
            self.assertEqual(pp[pp.index(flag) + 1], val, flag)
        for flag, val in (("-p", "0"), ("-n", "128"), ("-d", "512"), ("-fa", "0,1")):
            self.assertEqual(tg[tg.index(flag) + 1], val, flag)
        batched = calls[2:]
        self.assertEqual(len(batched), 4)  # 2 fa settings x 2 reps
        self.assertEqual(sorted(c[c.index("-fa") + 1] for c in batched), ["off", "off", "on", "on"])
        c = batched[0]
        for flag, val in (("-npp", "512"), ("-ntg", "128"), ("-npl", "1,8,64,1"),
                          ("-c", str(64 * (512 + 128))), ("--output-format", "jsonl"), ("-ngl", "99")):
            self.assertEqual(c[c.index(flag) + 1], val, flag)
        # Best: fa 1, ub 2048 for prefill (the fake makes it fastest).
        self.assertAlmostEqual(res["prefill"]["4096"]["tokens_per_s"], 4096000 + 10 + 2.048)
        self.assertEqual((res["prefill"]["512"]["flash_attn"], res["prefill"]["512"]["n_ubatch"]), (1, 2048))
        self.assertEqual(res["decode_llama_bench_b1"]["tokens_per_s"], 51.0)
        self.assertEqual(res["decode_llama_bench_b1"]["context"], 512)
        self.assertEqual(res["decode"]["8"]["tokens_per_s"], 321.0)
        self.assertEqual(res["decode"]["64"]["flash_attn"], 1)
        # Batch 1: llama-bench's 51 beats batched-bench's 41.
        self.assertEqual(res["decode"]["1"]["tokens_per_s"], 51.0)
        self.assertEqual(res["decode"]["1"]["source"], "llama-bench")
        self.assertEqual(res["gpu_info"], "NVIDIA GeForce RTX 4080")

    def test_missing_binary_or_model(self):
        os.remove(os.path.join(self.bin, "llama-batched-bench"))
        with self.assertRaises(SystemExit) as e:
            peer.main(["--bin-dir", self.bin, "--model", self.model])
        self.assertIn("llama-batched-bench missing", str(e.exception))


def kvgate_json(name="llama3-8b"):
    return {"peak_tflops": 1000.0, "peak_gbps": 4000.0, "models": {name: {
        "config": {"n_layers": 32, "n_embd": 4096, "n_ff": 14336, "n_heads": 32, "n_kv_heads": 8,
                   "head_dim": 128, "n_vocab": 128256, "weight_type": "f16",
                   "gemv_weight_bytes": 16.06e9},
        "prefill": {"512": {"ms": 100.0, "tokens_per_s": 5120.0, "flops": 8.0e12, "tflops": 80.0,
                            "fraction": 0.08}},
        "decode": {"plain": {"batch": 1, "context": 512, "steps": 128, "ms_per_token": 10.0,
                             "tokens_per_s": 100.0, "bytes_per_step": 16.1e9, "gbps": 1610.0,
                             "fraction": 0.4025},
                   "graph": {"batch": 1, "context": 512, "steps": 128, "ms_per_token": 8.0,
                             "tokens_per_s": 125.0, "bytes_per_step": 16.1e9, "gbps": 2012.5,
                             "fraction": 0.503}}}}}


class Table(unittest.TestCase):
    def test_rows(self):
        llama = {"prefill": {"512": {"tokens_per_s": 10240.0, "flash_attn": 1, "n_ubatch": 512}},
                 "decode": {"1": {"tokens_per_s": 100.0, "flash_attn": 1, "context": 512},
                            "8": {"tokens_per_s": 640.0, "flash_attn": 0, "context": 512}}}
        rows = {r["metric"]: r for r in table.build_rows(kvgate_json(), {"llama3-8b": llama})}
        p = rows["prefill 512"]
        self.assertAlmostEqual(p["ratio"], 0.5)
        # Same FLOPs as kvgate's count, in half the time: 160 TFLOP/s.
        self.assertAlmostEqual(p["llama_rate"], 160.0)
        self.assertAlmostEqual(p["llama_fraction"], 0.16)
        d1 = rows["decode b1"]
        self.assertAlmostEqual(d1["kvgate_tokens_per_s"], 125.0)  # graph beats plain
        self.assertAlmostEqual(d1["ratio"], 1.25)
        kv_row = 2.0 * 32 * 8 * 128 * 2
        want = (16.06e9 + kv_row * (512 + 64.5)) * 100.0 / 1e9
        self.assertAlmostEqual(d1["llama_rate"], want, places=3)
        d8 = rows["decode b8"]
        self.assertIsNone(d8["kvgate_tokens_per_s"])
        self.assertIsNone(d8["ratio"])
        self.assertAlmostEqual(d8["llama_rate"], (16.06e9 + 8 * kv_row * (512 + 64.5)) * 80.0 / 1e9, places=3)
        self.assertIsNone(rows["decode b64"]["llama_tokens_per_s"])
        text = table.format_table(list(rows.values()), 1000.0, 4000.0)
        self.assertIn("0.50x <", text)
        self.assertIn("1.25x", text)
        self.assertIn("n/a", text)

    def test_model_kvgate_failed_on_keeps_llama_rows(self):
        llama = {"prefill": {"512": {"tokens_per_s": 10240.0}},
                 "decode": {"1": {"tokens_per_s": 90.0}, "64": {"tokens_per_s": 900.0}}}
        rows = table.build_rows(kvgate_json(), {"smollm2": llama})
        other = {r["metric"]: r for r in rows if r["model"] == "smollm2"}
        self.assertEqual(set(other), {"prefill 512", "decode b1", "decode b8", "decode b64"})
        self.assertEqual(other["decode b64"]["llama_tokens_per_s"], 900.0)
        self.assertIsNone(other["decode b8"]["llama_tokens_per_s"])
        self.assertIsNone(other["prefill 512"]["ratio"])
        self.assertIsNone(other["prefill 512"]["kvgate_tokens_per_s"])
        # No kvgate file at all: the peaks come from the flags.
        d = tempfile.mkdtemp(prefix="kvgate_table_test_")
        try:
            path = os.path.join(d, "p.json")
            with open(path, "w") as fh:
                json.dump(llama, fh)
            out = io.StringIO()
            old = sys.stdout
            sys.stdout = out
            try:
                table.main(["--llama", f"smollm2={path}", "--peak-tflops", "989", "--peak-gbps", "3350"])
            finally:
                sys.stdout = old
            self.assertIn("10240.0", out.getvalue())
            self.assertIn("989 TFLOP/s", out.getvalue())
            with self.assertRaises(SystemExit):
                table.main(["--llama", f"smollm2={path}"])
        finally:
            shutil.rmtree(d, ignore_errors=True)


class DriverScript(unittest.TestCase):
    """scripts/bench-gpu.sh with --skip-build, fakes for nvidia-smi, the
    kvgate binaries and llama.cpp's: the plumbing from flags to table."""

    def test_end_to_end_with_fakes(self):
        self.run_driver(kvgate_fails=False)

    def test_kvgate_failure_still_gives_llama_rows(self):
        self.run_driver(kvgate_fails=True)

    def run_driver(self, kvgate_fails):
        d = tempfile.mkdtemp(prefix="kvgate_bench_gpu_test_")
        try:
            fakebin, kvbin, lbin, out = (os.path.join(d, x) for x in ("path", "kv", "llama", "out"))
            for x in (fakebin, kvbin, lbin):
                os.mkdir(x)
            _exe(os.path.join(fakebin, "nvidia-smi"),
                 "#!/bin/sh\n[ \"$1\" = --query-gpu=name ] && echo 'NVIDIA H100 80GB HBM3' || echo table\n")
            _exe(os.path.join(kvbin, "kvgate_make_synthetic_gguf"), textwrap.dedent("""\
                #!/usr/bin/env python3
                import sys; a = sys.argv; open(a[a.index("--out") + 1], "wb").write(b"GGUF synthetic")
                """))
            _exe(os.path.join(kvbin, "kvgate_engine_cuda_bench"), textwrap.dedent(f"""\
                #!/usr/bin/env python3
                import json, os, sys
                a = sys.argv
                if os.environ.get("FAKE_KVGATE_FAIL"): sys.exit("create: out of memory")
                with open({os.path.join(d, 'kv_argv.log')!r}, "a") as fh: fh.write(json.dumps(a[1:]) + "\\n")
                j = {json.dumps(kvgate_json("NAME"))}
                j["models"] = {{a[a.index("--name") + 1]: j["models"]["NAME"]}}
                j["peak_tflops"] = float(a[a.index("--peak-tflops") + 1])
                j["peak_gbps"] = float(a[a.index("--peak-gbps") + 1])
                json.dump(j, open(a[a.index("--json") + 1], "w"))
                print("kvgate fake ran")
                """))
            for name in ("llama-bench", "llama-batched-bench"):
                _exe(os.path.join(lbin, name), FAKE_BENCH)
            synth = os.path.join(d, "synth.gguf")
            smol = os.path.join(d, "smol.gguf")
            with open(smol, "wb") as fh:
                fh.write(b"GGUF smollm2")
            env = dict(os.environ, PATH=fakebin + os.pathsep + os.environ["PATH"],
                       FAKE_LOG=os.path.join(d, "argv.log"),
                       FAKE_TEMPLATE=os.path.join(DATA, "llama_bench_readme.json"))
            if kvgate_fails:
                env["FAKE_KVGATE_FAIL"] = "1"
            p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "bench-gpu.sh"), "--skip-build",
                                "--kvgate-bin", kvbin, "--llama-bin", lbin, "--out", out,
                                "--synthetic", synth, "--reps", "1", "--models", "smollm2,llama3-8b",
                                "--smollm2", smol],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               timeout=120)
            self.assertTrue(os.path.exists(synth))  # made because it was missing
            if kvgate_fails:
                self.assertEqual(p.returncode, 1, p.stderr[-3000:])
                self.assertIn("failed steps: kvgate smollm2 kvgate llama3-8b", p.stderr)
                rows = {r["metric"]: r for r in
                        json.loads(_slurp(os.path.join(out, "summary.json")))["rows"]
                        if r["model"] == "llama3-8b"}
                self.assertAlmostEqual(rows["prefill 512"]["llama_tokens_per_s"], 512012.048)
                self.assertIsNone(rows["prefill 512"]["kvgate_tokens_per_s"])
                return
            self.assertEqual(p.returncode, 0, p.stderr[-3000:])
            kv_calls = [json.loads(x) for x in _slurp(os.path.join(d, "kv_argv.log")).splitlines()]
            self.assertEqual([c[c.index("--model-file") + 1] for c in kv_calls], [smol, synth])
            kv_argv = kv_calls[1]
            for flag, val in (("--model-file", synth), ("--name", "llama3-8b"), ("--peak-tflops", "989"),
                              ("--peak-gbps", "3350"), ("--decode-steps", "128"),
                              ("--decode-context", "512"), ("--prefill", "512,4096")):
                self.assertEqual(kv_argv[kv_argv.index(flag) + 1], val, flag)
            text = _slurp(os.path.join(out, "table.txt"))
            self.assertIn("llama3-8b", text)
            self.assertIn("decode b64", text)
            summary = json.loads(_slurp(os.path.join(out, "summary.json")))
            self.assertEqual({r["model"] for r in summary["rows"]}, {"smollm2", "llama3-8b"})
            rows = {r["metric"]: r for r in summary["rows"] if r["model"] == "llama3-8b"}
            self.assertEqual(summary["peak_tflops"], 989.0)
            # kvgate fake: 5120 tok/s at 512; llama fake: 1000 x 512 + 10 + 2.048.
            self.assertAlmostEqual(rows["prefill 512"]["ratio"], 5120.0 / 512012.048)
            self.assertAlmostEqual(rows["decode b1"]["ratio"], 125.0 / 51.0)
            self.assertAlmostEqual(rows["decode b64"]["llama_tokens_per_s"], 40.0 * 64 + 1)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_no_gpu_is_a_clear_error(self):
        env = dict(os.environ, PATH="/usr/bin:/bin")
        if shutil.which("nvidia-smi", path=env["PATH"]):
            self.skipTest("this machine has nvidia-smi")
        p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "bench-gpu.sh"), "--skip-build"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        self.assertEqual(p.returncode, 1)
        self.assertIn("nvidia-smi not found", p.stderr)


class LlamaCppLoadsSyntheticGguf(unittest.TestCase):
    def test_load_and_decode(self):
        tool = os.environ.get("KVGATE_MAKE_SYNTHETIC_GGUF")
        if not tool or not os.access(tool, os.X_OK):
            self.skipTest("KVGATE_MAKE_SYNTHETIC_GGUF not set (ctest sets it)")
        try:
            import llama_cpp
            import numpy as np
        except ImportError:
            self.skipTest("llama-cpp-python or numpy not installed")
        d = tempfile.mkdtemp(prefix="kvgate_synth_llama_")
        try:
            path = os.path.join(d, "tiny.gguf")
            subprocess.run([tool, "--shape", "tiny", "--layers", "3", "--out", path], check=True,
                           stderr=subprocess.DEVNULL)

            @llama_cpp.llama_log_callback
            def quiet(level, text, user_data):
                pass
            llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
            self.assertTrue(model, "llama.cpp cannot load the synthetic GGUF")
            vocab = llama_cpp.llama_model_get_vocab(model)
            self.assertEqual(llama_cpp.llama_vocab_n_tokens(vocab), 1024)
            self.assertEqual(llama_cpp.llama_model_n_layer(model), 3)
            self.assertEqual(llama_cpp.llama_model_n_embd(model), 256)
            cp = llama_cpp.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 64, 64, 1, 1
            ctx = llama_cpp.llama_init_from_model(model, cp)
            self.assertTrue(ctx)
            pos = 0
            for toks in ([1, 500, 1023, 7], [42], [9]):  # a prefill, then two decode steps
                b = llama_cpp.llama_batch_init(len(toks), 0, 1)
                b.n_tokens = len(toks)
                for i, t in enumerate(toks):
                    b.token[i], b.pos[i], b.n_seq_id[i] = t, pos + i, 1
                    b.seq_id[i][0] = 0
                    b.logits[i] = 1 if i == len(toks) - 1 else 0
                self.assertEqual(llama_cpp.llama_decode(ctx, b), 0)
                llama_cpp.llama_batch_free(b)
                pos += len(toks)
                row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(1024,))
                self.assertTrue(np.isfinite(row).all())
                self.assertGreater(float(row.std()), 0.1)
            llama_cpp.llama_free(ctx)
            llama_cpp.llama_model_free(model)
        finally:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
