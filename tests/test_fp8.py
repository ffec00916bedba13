"""FP8 frozen base: quantizing per row and per 128x128 block against the exact values, the FP8 linear's forward
and input gradient against a float32 product, block-scaled checkpoints written here and read back (with and
without --fp8), the merge of an FP8 base, and the refusal where FP8 cannot run. The speed is measured on a GPU
in bench/, never here."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from merak_lora import fp8

E4M3_STEP = 2.0 ** -3  # e4m3 keeps 3 mantissa bits: a rounding error of at most half a step, relative
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "init_lora_weights": False}


def _bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What e4m3 rounding may cost each entry: half a step relative, or the subnormal step near zero."""
    return x.abs() * E4M3_STEP / 2 + scale * 2.0 ** -9


def test_row_quantization_stays_within_e4m3_rounding():
    torch.manual_seed(0)
    x = torch.randn(48, 96) * torch.logspace(-3, 2, 48)[:, None]  # rows of very different sizes
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (48, 1)
    back = fp8.dequantize_rows(q, scale)
    assert (back - x).abs().le(_bound(x, scale)).all()
    # each row uses the whole range: its largest entry lands on e4m3's largest value
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((48,), 448.0))


@pytest.mark.parametrize("shape,tile", [((256, 384), (128, 128)), ((100, 72), (32, 32))])
def test_block_quantization_round_trip(shape, tile):
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.02
    w[:tile[0], :tile[1]] *= 50  # one tile much larger than the rest: its scale must not reach the others
    q, scale_inv = fp8.quantize_blocks(w, tile)
    assert scale_inv.shape == (-(-shape[0] // tile[0]), -(-shape[1] // tile[1]))
    assert fp8.tiles_fit(shape, tuple(scale_inv.shape), tile)
    expanded = fp8._expand(scale_inv, tile, *shape)
    back = fp8.dequantize_blocks(q, scale_inv, torch.float32, tile)
    assert (back - w).abs().le(_bound(w, expanded)).all()
    # requantized with one scale per row: within one more rounding of the block-scaled values
    rq, rs = fp8.rows_from_blocks(q, scale_inv, tile)
    assert rq.dtype == torch.float8_e4m3fn and rs.shape == (shape[0], 1)
    assert (fp8.dequantize_rows(rq, rs) - back).abs().le(_bound(back, rs)).all()


def test_fp8_linear_forward_and_input_gradient_match_the_float32_product():
    torch.manual_seed(2)
    w = torch.randn(96, 64) * 0.05
    x = torch.randn(2, 9, 64, requires_grad=True)  # 18 rows: padded to 32 inside and cut back
    lin = fp8.Fp8Linear.from_weight(w.to(torch.bfloat16), None, torch.device("cpu"), torch.float32)
    assert lin.weight.dtype == torch.float8_e4m3fn and not list(lin.parameters())
    out = lin(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = ref_x @ w.t()
    ref.backward(grad)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert out.shape == (2, 9, 96) and rel(out, ref) < 0.05  # two e4m3 roundings, ~2-3% each at worst
    assert x.grad.shape == x.shape and rel(x.grad, ref_x.grad) < 0.05
    assert rel(out, ref) > 1e-4  # the product really ran in FP8


class _ReferenceProduct(torch.autograd.Function):
    """The FP8 linear's arithmetic spelled out in float32 (the same quantized values, no _scaled_mm): what the
    FP8 stage must reproduce up to the order of the sums."""

    @staticmethod
    def forward(ctx, x, wq, w_scale):
        ctx.save_for_backward(wq, w_scale)
        xq, xs = fp8.quantize_rows(x.reshape(-1, x.shape[-1]))
        out = fp8.dequantize_rows(xq, xs) @ fp8.dequantize_rows(wq, w_scale).t()
        return out.to(x.dtype).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        wq, w_scale = ctx.saved_tensors
        gq, gs = fp8.quantize_rows(grad.reshape(-1, grad.shape[-1]) * w_scale.t())
        dx = fp8.dequantize_rows(gq, gs) @ wq.float()
        return dx.to(grad.dtype).view(*grad.shape[:-1], -1), None, None


def _fp8_checkpoint(src: str, dst: str, tile: tuple[int, int]) -> dict[str, torch.Tensor]:
    """`src` rewritten the way the FP8 releases ship: every linear inside the layers as e4m3 + weight_scale_inv,
    and config.json's quantization_config. Returns the dequantized weights (what the FP8 file stands for)."""
    shutil.copytree(src, dst)
    exact = {}
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
    for fname in sorted(set(index["weight_map"].values())):
        tensors = load_file(os.path.join(dst, fname))
        out = {}
        for key, t in tensors.items():
            if ".layers." in key and key.endswith("proj.weight"):
                q, s = fp8.quantize_blocks(t, tile)
                out[key], out[key + "_scale_inv"] = q, s
                index["weight_map"][key + "_scale_inv"] = fname
                exact[key] = fp8.dequantize_blocks(q, s, torch.float32, tile)
            else:
                out[key] = t
        save_file(out, os.path.join(dst, fname), metadata={"format": "pt"})
    json.dump(index, open(os.path.join(dst, "model.safetensors.index.json"), "w"))
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(tile)}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return exact


def _stage_outputs(model_path: str, quant=None, bf16: bool = False):
    """Logits of a one-stage model on fixed ids, and its LoRA gradients."""
    from merak_lora.config import Config
    from merak_lora.layout import init_distributed
    from merak_lora.lora import adapter_params
    from merak_lora.plan import build_stages, make_plan
    cfg = Config(model_path=model_path, seed=5, bf16=bf16)
    plan = make_plan(cfg, 1, LORA)
    stage = build_stages(cfg, plan, init_distributed(1, 1, False, "cpu"), quant)[0]
    ids = torch.randint(3, plan.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = stage.model(input_ids=ids).logits
    logits.float().square().mean().backward()
    grads = {k: p.grad.float().clone() for k, p in adapter_params(stage.model).items()}
    return stage, logits.detach().float(), grads


def test_block_scaled_checkpoint_loads_dequantized_or_as_fp8(tiny_llama, tmp_path, monkeypatch):
    from merak_lora.quant import Fp8
    exact = _fp8_checkpoint(tiny_llama, str(tmp_path / "fp8"), (32, 32))
    # the same model written in float32 with the values the FP8 file stands for
    plain = str(tmp_path / "dequantized")
    shutil.copytree(tiny_llama, plain)
    for fname in os.listdir(plain):
        if fname.endswith(".safetensors"):
            tensors = load_file(os.path.join(plain, fname))
            save_file({k: exact.get(k, t) for k, t in tensors.items()}, os.path.join(plain, fname),
                      metadata={"format": "pt"})

    _, want, want_grads = _stage_outputs(plain)
    _, got, got_grads = _stage_outputs(str(tmp_path / "fp8"))  # without --fp8: dequantized as it loads
    assert torch.equal(got, want)
    assert all(torch.equal(got_grads[k], want_grads[k]) for k in want_grads)

    stage, fp8_logits, fp8_grads = _stage_outputs(str(tmp_path / "fp8"), Fp8(torch.float32))
    held = [m for m in stage.model.modules() if isinstance(m, fp8.Fp8Linear)]
    assert len(held) == 4 * 7  # every linear of the 4 layers, LoRA-wrapped or not
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in held)
    monkeypatch.setattr(fp8._Fp8Product, "apply", _ReferenceProduct.apply)
    _, ref_logits, ref_grads = _stage_outputs(str(tmp_path / "fp8"), Fp8(torch.float32))
    assert torch.allclose(fp8_logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert set(fp8_grads) == set(ref_grads) == set(want_grads)
    assert all(torch.allclose(fp8_grads[k], ref_grads[k], rtol=1e-3, atol=1e-6) for k in ref_grads)
    # and FP8 stays near the unquantized model (a tiny random net amplifies rounding: ~20% on its logits)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert 1e-3 < rel(fp8_logits, want) < 0.4


def test_bf16_checkpoint_quantized_as_the_stage_loads(tiny_llama, monkeypatch):
    from merak_lora.quant import Fp8
    stage, got, grads = _stage_outputs(tiny_llama, Fp8(torch.bfloat16), bf16=True)
    lin = stage.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(lin.base_layer, fp8.Fp8Linear) and lin.lora_A["default"].weight.dtype == torch.float32
    assert lin.base_layer.weight_scale.shape == (lin.out_features, 1)
    monkeypatch.setattr(fp8._Fp8Product, "apply", _ReferenceProduct.apply)
    _, want, want_grads = _stage_outputs(tiny_llama, Fp8(torch.bfloat16), bf16=True)
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-2)  # bf16 outputs: a rounding apart at most
    assert all(((grads[k] - want_grads[k]).norm() / want_grads[k].norm()) < 2e-2 for k in want_grads)


def test_merge_onto_an_fp8_base_writes_bf16(tiny_llama, tmp_path):
    """The adapter was trained against the dequantized base; merged, the FP8 tensors and their scales are gone
    and the model loads in transformers as a plain bf16 model."""
    from transformers import AutoModelForCausalLM

    from merak_lora.export import merge
    exact = _fp8_checkpoint(tiny_llama, str(tmp_path / "fp8"), (32, 32))
    ckpt = _tiny_checkpoint(tmp_path, str(tmp_path / "fp8"))
    merge(ckpt, str(tmp_path / "merged"))
    merged = {}
    for fname in os.listdir(tmp_path / "merged"):
        if fname.endswith(".safetensors"):
            merged.update(load_file(str(tmp_path / "merged" / fname)))
    assert not any(k.endswith("_scale_inv") for k in merged)
    assert {t.dtype for k, t in merged.items() if k in exact} == {torch.bfloat16}
    cfg = json.load(open(tmp_path / "merged" / "config.json"))
    assert "quantization_config" not in cfg
    key = "model.layers.0.mlp.up_proj.weight"  # not a LoRA target: the dequantized base, in bf16
    assert torch.equal(merged[key], exact[key].to(torch.bfloat16))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))


def _tiny_checkpoint(tmp_path, model_path: str) -> str:
    """A two-step training run's checkpoint on `model_path` (one process)."""
    from merak_lora.finetune import main
    lora = tmp_path / "lora.json"
    lora.write_text(json.dumps({k: v for k, v in LORA.items() if k != "init_lora_weights"}))
    out = tmp_path / "run"
    assert main(["--model_path", model_path, "--data_path", os.path.join(os.path.dirname(__file__), "..", "data",
                                                                        "sample.json"),
                 "--lora_config", str(lora), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "2",
                 "--seq_length", "64"]) == 0
    return str(out / "checkpoint-2")


def test_fp8_flag_is_refused_on_the_cpu_before_any_weight_is_read(tiny_llama, tmp_path, capsys):
    from merak_lora.finetune import main
    from conftest import LORA_CONFIG, SAMPLE
    code = main(["--model_path", tiny_llama, "--data_path", SAMPLE, "--lora_config", LORA_CONFIG,
                 "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--fp8", "true"])
    err = capsys.readouterr().err
    assert code == 2 and "--fp8 true needs" in err and "this rank's device is cpu" in err, err
    assert "Traceback" not in err
    code = main(["--model_path", tiny_llama, "--data_path", SAMPLE, "--lora_config", LORA_CONFIG,
                 "--output_dir", str(tmp_path / "out2"), "--fp8", "true", "--load_in_4bit", "true"])
    assert code == 2 and "--fp8 and --load_in_4bit" in capsys.readouterr().err
