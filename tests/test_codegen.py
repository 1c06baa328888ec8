"""Generated source (golden files), the FlexAttention export, and `attndsl compile`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from sources import MIXED

import attndsl
from attndsl.cli import main
from attndsl.codegen.flex import flex_source
from attndsl.codegen.triton.generate import KERNELS, functions

pytest.importorskip("triton")

PER_HEAD = MIXED

GOLDEN = [
    ("sliding_window", "patterns/sliding.attn", dict(N=100, window=20), 32),
    ("power_attention", "patterns/power.attn", dict(N=300, block=16), 32),
    ("na2d", "patterns/neighborhood.attn", dict(H=12, W=10, kernel=5, dilation=(1, 2)), 16),
    ("document_causal", "patterns/document.attn", dict(N=64), 16),
    ("mixed", PER_HEAD, dict(N=50), 16),
    ("dhsa_chunks", "patterns/dhsa.attn", dict(N=64, block=16, chunk=8, topk=2), 16),
    ("moh", "patterns/moh.attn", dict(N=64, heads=4, shared=1, topk=2), 16),
    ("combiner_logsparse", "patterns/combiner.attn", dict(N=64), 16),
]


@pytest.mark.parametrize("name,src,params,block", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_generated_triton_source_golden(golden, name, src, params, block):
    """Only _mask, _bias and _smask are generated; the kernels around them are fixed."""
    op = attndsl.compile(src, name, **params).options(block_q=block, block_k=block)
    inputs = {"doc": torch.tensor([0] * 30 + [1] * 34)} if name == "document_causal" else {}
    golden(f"kernels/{name}.py", functions(op.bound))
    assert op.source(**inputs) == KERNELS.read_text().rstrip("\n") + "\n\n\n" + functions(
        op.bound)


def test_fixed_kernels_are_one_template():
    """Every pattern's module is the same kernels.py text: only the functions differ."""
    a = attndsl.compile(GOLDEN[0][1], GOLDEN[0][0], **GOLDEN[0][2]).source()
    b = attndsl.compile(GOLDEN[2][1], GOLDEN[2][0], **GOLDEN[2][2]).source()
    head = KERNELS.read_text()
    assert a.startswith(head.rstrip("\n")) and b.startswith(head.rstrip("\n"))
    assert "def attn_fwd(" not in functions(attndsl.compile(GOLDEN[0][1], GOLDEN[0][0],
                                                            **GOLDEN[0][2]).bound)


def test_flex_source_golden(golden):
    golden("kernels/mixed_flex.py", flex_source(attndsl.compile(PER_HEAD, N=50).bound))


FLEX = [
    ("patterns/sliding.attn", "sliding_window", dict(N=70, window=9), {}),
    ("patterns/power.attn", "power_attention", dict(N=200, block=16), {}),
    ("patterns/power.attn", "longnet", dict(N=200, block=4), {}),
    ("patterns/neighborhood.attn", "na3d", dict(T=4, H=7, W=6, kernel=3, dilation=(1, 2, 1),
                                                 causal=(True, False, False)), {}),
    ("patterns/sparse_transformer.attn", "fixed", dict(N=90, stride=10, c=2), {}),
    ("patterns/document.attn", "document_causal", dict(N=50),
     {"doc": torch.tensor([0] * 20 + [1] * 30)}),
    ("patterns/document.attn", "prefix_lm", dict(N=50), {"prefix": 7}),
]


@pytest.mark.parametrize("file,pattern,params,inputs", FLEX, ids=[f[1] for f in FLEX])
def test_flex_mask_mod_equals_mask(file, pattern, params, inputs):
    op = attndsl.compile(file, pattern, **params)
    ns: dict = {}
    exec(compile(flex_source(op.bound), "<flex>", "exec"), ns)  # noqa: S102 - our output
    ns["set_inputs"](**{k: (v if isinstance(v, torch.Tensor) else torch.tensor(v))
                        for k, v in inputs.items()})
    qi = torch.arange(op.bound.nq).view(-1, 1)
    ki = torch.arange(op.bound.nk).view(1, -1)
    got = ns["mask_mod"](torch.tensor(0), torch.tensor(0), qi, ki)
    assert torch.equal(got.expand(op.bound.nq, op.bound.nk), op.mask(**inputs))


def test_flex_export_with_per_head_rules_and_score_mod_runs_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    op = attndsl.compile(PER_HEAD, N=48)
    ns: dict = {}
    exec(compile(flex_source(op.bound), "<flex>", "exec"), ns)  # noqa: S102 - our output
    q, k, v = (torch.randn(1, 4, 48, 16) for _ in range(3))
    bm = op.block_mask(block_size=16)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, score_mod=ns["score_mod"], block_mask=bm)
    ref = op(q, k, v, backend="reference")
    assert (out - ref).abs().max() < 1e-4


def test_flex_refuses_summaries():
    op = attndsl.compile("patterns/combiner.attn", "combiner_fixed", N=32, span=8)
    with pytest.raises(attndsl.UnsupportedError, match="mask_mod cannot express"):
        flex_source(op.bound)


def test_source_holds_no_pattern_text():
    src = """
    fn secret_helper_name(x: int) -> int = x % 5
    pattern p(N: int) {
        space seq(N)
        let another_secret = q - k
        attend secret_helper_name(another_secret) == 0 and k <= q
    }"""
    op = attndsl.compile(src, N=40).options(block_q=16, block_k=16)
    code = op.source()
    assert "secret" not in code
    assert "_fmod((q_idx) - (k_idx), 5)" in code.replace("t1", "(q_idx) - (k_idx)") or (
        "_fmod(" in code)


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_compile_stats(capsys):
    code, out, err = _run(["compile", "patterns/neighborhood.attn", "-p", "na2d", "--set",
                           "H=128", "--set", "W=128", "--set", "kernel=13"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == ("na2d(H=128, W=128, kernel=(13, 13), dilation=(1, 1), stride=(1, 1), "
                        "causal=(False, False)): queries tiles 8x8, keys tiles 8x8")
    assert lines[1:8] == [
        "  blocks          64 x 64 tokens",
        "  full            0",
        "  partial         2,116",
        "  empty           63,420",
        "  computed        8,667,136 score elements",
        "  needed          2,768,896 (the mask's nnz)",
        "  waste           3.13x computed / needed",
    ]
    assert lines[8].startswith("  block tables    ") and lines[9].startswith("  build ")


def test_cli_compile_json_and_errors(capsys, tmp_path):
    code, out, _ = _run(["compile", "patterns/sliding.attn", "-p", "sliding_window", "--set",
                         "N=4096", "--set", "window=256", "--json"], capsys)
    assert code == 0
    stats = json.loads(out)["stats"]
    assert stats["needed_elements"] == 4096 * 256 - 256 * 255 // 2
    # per query block i: the diagonal block and block i-4 are PARTIAL, i-1..i-3 FULL
    assert stats["partial_blocks"] == 64 + 60 and stats["full_blocks"] == 1 + 2 + 61 * 3
    code, _, err = _run(["compile", "patterns/sliding.attn", "-p", "sliding_window", "--set",
                         "N=64", "--set", "window=4", "--emit", "flex"], capsys)
    assert code == 1 and err.strip() == "error: --emit flex needs -o DIR"
    code, _, err = _run(["compile", "patterns/sliding.attn", "-p", "sliding_window", "--set",
                         "N=64", "--set", "window=4", "--block-q", "24"], capsys)
    assert code == 1 and err.strip() == "error: block_q must be a power of two >= 16, not 24"
    code, _, err = _run(["compile", "patterns/combiner.attn", "-p", "combiner_fixed", "--set",
                         "N=64", "--set", "span=8", "-o", str(tmp_path), "--emit", "flex"],
                        capsys)
    assert code == 1 and "which a FlexAttention mask_mod cannot express" in err
    assert "patterns/combiner.attn:" in err and "^" in err


def test_cli_export_imports_as_op(tmp_path, capsys):
    code, out, err = _run(["compile", "patterns/document.attn", "-p", "document_causal",
                           "--set", "N=40", "--input", "doc=" + ",".join(["0"] * 15 + ["1"] * 25),
                           "--block-q", "16", "--block-k", "16", "-o", str(tmp_path),
                           "--emit", "flex"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "attn_document_causal.npz", "attn_document_causal.py", "attn_document_causal_flex.npz",
        "attn_document_causal_flex.py"]
    script = (
        "import torch, attn_document_causal as m\n"
        "op = m.op\n"
        "doc = torch.tensor([0] * 15 + [1] * 25)\n"
        "kern = op.kernel(doc=doc)\n"
        "assert kern.module is m, 'the exported kernels are used'\n"
        "q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))\n"
        "a = op(q, k, v, backend='triton', doc=doc)\n"
        "b = op(q, k, v, backend='reference', doc=doc)\n"
        "print(float((a - b).abs().max()), m.METADATA['stats']['needed_elements'])\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    err_max, needed = r.stdout.split()
    assert float(err_max) < 1e-4
    assert int(needed) == 15 * 16 // 2 + 25 * 26 // 2


def test_two_processes_compile_into_one_cache(tmp_path):
    """Both finish, both import the same complete module, and one file is left."""
    script = (
        "import attndsl\n"
        "op = attndsl.compile('patterns/power.attn', 'power_attention', N=300, block=16)\n"
        "op.options(block_q=16, block_k=16)\n"
        "print(len(op.source()))\n")
    env = dict(os.environ, ATTNDSL_CACHE=str(tmp_path), TRITON_INTERPRET="1")
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    files = list(tmp_path.glob("attndsl_*.py"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    assert len(files[0].read_text()) == int(outs[0][0])


def test_exported_content_dependent_pattern_runs(tmp_path, monkeypatch):
    """An exported DHSA module keeps its run-time selection (chunk_topk) wiring."""
    import importlib

    from attndsl.codegen.export import export
    op = attndsl.compile("patterns/dhsa.attn", "dhsa_chunks", N=64, block=16, chunk=8, topk=2)
    export(op.options(block_q=16, block_k=16), tmp_path, "dhsa_export")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("dhsa_export")
    assert mod.op.kernel().module is mod
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    a = mod.op(q, k, v, backend="triton")
    b = mod.op(q, k, v, backend="reference")
    assert (a - b).abs().max() < 1e-4
