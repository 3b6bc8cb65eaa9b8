"""Hugging Face transformers integration: `set_experts_implementation("simple_moe")` on tiny random-weight models (no downloads).

Skipped when transformers (>= 5, with `transformers.integrations.moe.ExpertsInterface`) is not installed.
"""
import copy
import importlib
import importlib.util
import types
import warnings

import pytest
import torch

hf = pytest.importorskip("transformers")
hf_moe = pytest.importorskip("transformers.integrations.moe")
if not hasattr(hf_moe, "ExpertsInterface"):
    pytest.skip("transformers < 5: no ExpertsInterface", allow_module_level=True)

from simple_moe.integrations import transformers as smt  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LOGITS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}  # whole model vs grouped_mm
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB, HIDDEN, INTER, EXPERTS, TOP_K = 128, 64, 32, 8, 2

smt.register()


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ---------------------------------------------------------------------------------------------------------------------------------
# Tiny models (sizes and keywords from docs/transformers.md)

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, num_experts_per_tok=TOP_K)
MODELS = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=INTER, shared_expert_intermediate_size=INTER, intermediate_size=2 * INTER,
                       num_experts=EXPERTS)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(moe_intermediate_size=INTER, num_experts=EXPERTS)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=INTER, num_local_experts=EXPERTS)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=INTER, num_experts=EXPERTS)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(moe_intermediate_size=INTER, intermediate_size=2 * INTER, n_routed_experts=EXPERTS, n_shared_experts=1,
                         n_group=1, topk_group=1, first_k_dense_replace=0, q_lora_rank=32, kv_lora_rank=32,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(intermediate_size=INTER, num_local_experts=EXPERTS)),
}


def experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "down_proj") and isinstance(getattr(m, "down_proj"), torch.nn.Parameter)]


def randomize_moe(model, seed=0, gate_gain=1.0):
    """HF's init (std 0.02) makes every expert output tiny next to the residual stream; give experts and routers O(1) outputs so
    the MoE layers dominate the logits. `gate_gain` > 1 drives GPT-OSS's gate/up past its clamp limit (7) for some elements."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.modules():
            experts = getattr(block, "experts", None)
            if experts is None or experts not in experts_modules(model):
                continue
            router = getattr(block, "gate", None) or getattr(block, "router", None)
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * HIDDEN**-0.5 * 2)
            for name, p in experts.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                elif name == "down_proj":
                    p.copy_(torch.randn(p.shape, generator=gen) * INTER**-0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * HIDDEN**-0.5 * gate_gain)
    return model


_model_cache = {}


def tiny_model(name, dtype=torch.float32, layers=2):
    key = (name, dtype, layers)
    if key not in _model_cache:
        config_cls, model_cls, kw = MODELS[name]
        cfg = dict(_COMMON, num_hidden_layers=layers, **kw)
        if name == "deepseek_v3":
            cfg.pop("head_dim")  # derived from the MLA sizes
        torch.manual_seed(0)
        model = getattr(hf, model_cls)(getattr(hf, config_cls)(**cfg)).eval()
        randomize_moe(model, gate_gain=3.0 if name == "gpt_oss" else 1.0)
        _model_cache[key] = model.to(device=DEVICE, dtype=dtype)
    return _model_cache[key]


def logits(model, implementation, tokens):
    model.set_experts_implementation(implementation)
    with torch.no_grad():
        return model(tokens).logits


# ---------------------------------------------------------------------------------------------------------------------------------
# Whole models


def test_register_and_select():
    assert "simple_moe" in hf_moe.ALL_EXPERTS_FUNCTIONS
    assert hf_moe.ALL_EXPERTS_FUNCTIONS["simple_moe"] is smt.experts_forward
    model = tiny_model("qwen3_moe")
    model.set_experts_implementation("simple_moe")
    assert model.config._experts_implementation == "simple_moe"


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_grouped_mm_fp32(name):
    model = tiny_model(name)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = logits(model, "simple_moe", tokens)
    ref = logits(model, "grouped_mm", tokens)
    assert rel_err(ours, ref) <= LOGITS_TOLERANCE[torch.float32]


# In Triton's CPU interpreter one experts call costs ~0.2 s, so 16 greedy steps of every model would take minutes: on CPU two
# models cover both storage layouts (gate-first [E, 2I, H]; GPT-OSS's transposed, interleaved, biased); all six run on the GPU.
CPU_GENERATE_MODELS = ("qwen3_moe", "gpt_oss")
GENERATE_CASES = [name if name in CPU_GENERATE_MODELS else
                  pytest.param(name, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])
                  for name in MODELS]


@pytest.mark.parametrize("name", GENERATE_CASES)
def test_greedy_generate_same_tokens_fp32(name):
    model = tiny_model(name)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    generated = {}
    for implementation in ("simple_moe", "grouped_mm"):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            generated[implementation] = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                                       pad_token_id=0)
    assert generated["simple_moe"].shape[1] == prompt.shape[1] + 16
    assert torch.equal(generated["simple_moe"], generated["grouped_mm"])


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_torch_compile_fullgraph(name):
    """A whole model compiles with fullgraph=True (no graph break in our experts function), backend aot_eager.

    Bit-equal on CPU; on CUDA AOTAutograd's decompositions of the model's own norms/softmax round differently (our op is opaque
    and unchanged), so there the logits must agree to fp32 tolerance."""
    model = tiny_model(name)
    model.set_experts_implementation("simple_moe")
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        eager = model(tokens, use_cache=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: model(t, use_cache=False).logits, fullgraph=True, backend="aot_eager")
        out = compiled(tokens)
        if out.device.type == "cpu":
            assert torch.equal(out, eager)
        else:
            assert rel_err(out, eager) < TOLERANCE[torch.float32]


# ---------------------------------------------------------------------------------------------------------------------------------
# One experts module against transformers' own eager code run in float64


def float64_eager(module, hidden_states, top_k_index, top_k_weights):
    """The module's original (eager) forward on a float64 copy. EP sentinels (ids >= E) are clamped with weight 0, which drops
    them exactly (older eager code cannot index them)."""
    module64 = copy.deepcopy(module).double()
    sentinel = top_k_index >= module.num_experts
    original_forward = type(module).forward.__wrapped__  # the undecorated forward kept by functools.wraps
    return original_forward(module64, hidden_states.double(), top_k_index.clamp(max=module.num_experts - 1),
                            top_k_weights.double().masked_fill(sentinel, 0.0))


def routing_inputs(num_tokens, num_experts, dtype, sentinels=False, seed=4):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen)
    ids = torch.argsort(torch.rand(num_tokens, num_experts, generator=gen), dim=1)[:, :TOP_K]
    if sentinels:  # expert-parallel: some slots point at experts on other ranks, marked >= E
        ids[::3, 1] = num_experts
    weights = torch.softmax(torch.randn(num_tokens, TOP_K, generator=gen), dim=-1)
    return hidden.to(DEVICE, dtype), ids.to(DEVICE), weights.to(DEVICE, dtype)


GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


# bf16 only on the GPU: Triton 3.6's interpreter computes bf16 dots wrongly unless the test harness patches it.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=GPU_ONLY)])
@pytest.mark.parametrize("name", list(MODELS))
def test_experts_match_float64_eager(name, dtype):
    module = copy.deepcopy(experts_modules(tiny_model(name))[0]).to(dtype)
    hidden, ids, weights = routing_inputs(12, module.num_experts, dtype, sentinels=True)
    out = smt.experts_forward(module, hidden, ids, weights)
    assert out.dtype == dtype and out.shape == hidden.shape
    assert rel_err(out, float64_eager(module, hidden, ids, weights)) < TOLERANCE[dtype]


def test_mixed_dtype_router_weights_fp32():
    """Mixtral/DeepSeek-V3 pass float32 top_k_weights with bf16/fp16 hidden states."""
    module = copy.deepcopy(experts_modules(tiny_model("mixtral"))[0]).half()
    hidden, ids, weights = routing_inputs(10, module.num_experts, torch.float16)
    out = smt.experts_forward(module, hidden, ids, weights.float())
    assert out.dtype == torch.float16
    assert rel_err(out, float64_eager(module, hidden, ids, weights.float())) < TOLERANCE[torch.float16]


def test_biases_in_another_dtype_fall_back_to_grouped_mm():
    """fp16 experts with their biases kept in fp32: transformers' grouped_mm runs them; our epilogues read biases in the
    weights' dtype, so the module falls back to grouped_mm instead of raising about an argument the caller never named."""
    module = copy.deepcopy(experts_modules(tiny_model("gpt_oss"))[0]).half()
    module.gate_up_proj_bias = torch.nn.Parameter(module.gate_up_proj_bias.float(), requires_grad=False)
    module.down_proj_bias = torch.nn.Parameter(module.down_proj_bias.float(), requires_grad=False)
    hidden, ids, weights = routing_inputs(5, module.num_experts, torch.float16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one warning per class may have been given already
        out = smt.experts_forward(module, hidden, ids, weights)
        assert torch.equal(out, hf_moe.grouped_mm_experts_forward(module, hidden, ids, weights))
    with pytest.raises(smt.Unsupported, match="biases of dtype"):
        smt.plan_for(module)


def test_hidden_states_of_the_wrong_width_are_named():
    module = experts_modules(tiny_model("qwen3_moe"))[0]
    hidden, ids, weights = routing_inputs(3, module.num_experts, torch.float32)
    with pytest.raises(ValueError, match=f"^hidden_states: expected .* H = {HIDDEN}"):
        smt.experts_forward(module, hidden[:, : HIDDEN // 2], ids, weights)


def test_gpt_oss_weights_read_in_place(monkeypatch):
    """Transposed [E, H, 2I] storage goes to the kernels as a view of the parameter (no copy), interleaved, with SwigluBias."""
    module = experts_modules(tiny_model("gpt_oss"))[0]
    seen = {}
    real = smt.checked_moe_forward

    def spy(*args, **kwargs):
        seen.update(fc1=args[3], fc2=args[4], activation=args[5], **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(smt, "checked_moe_forward", spy)
    hidden, ids, weights = routing_inputs(4, module.num_experts, torch.float32)
    smt.experts_forward(module, hidden, ids, weights)
    assert seen["fc1"].data_ptr() == module.gate_up_proj.data_ptr() and seen["fc1"].shape == (EXPERTS, 2 * INTER, HIDDEN)
    assert seen["fc2"].data_ptr() == module.down_proj.data_ptr() and seen["fc2"].shape == (EXPERTS, HIDDEN, INTER)
    assert seen["gate_layout"] == "interleaved" and seen["activation"].name == "swiglu_bias"
    params = seen["activation_params"]
    assert params.shape == (EXPERTS, 3) and torch.allclose(params[0].cpu(), torch.tensor([1.702, 1.0, 7.0]))


def test_hidden_states_in_another_dtype_are_cast_and_cast_back():
    """Autocast: float32 hidden states on a float16 module run in float16 and come back float32 (grouped_mm does the same)."""
    module = copy.deepcopy(experts_modules(tiny_model("qwen3_moe"))[0]).half()
    hidden, ids, weights = routing_inputs(9, module.num_experts, torch.float32)
    out = smt.experts_forward(module, hidden, ids, weights)
    assert out.dtype == torch.float32 and out.shape == hidden.shape
    assert rel_err(out, float64_eager(module, hidden.half(), ids, weights)) < TOLERANCE[torch.float16]


def test_module_changed_after_the_first_call():
    """Nothing cached goes stale: GPT-OSS's clamp limit and alpha changed between calls (the activation parameters are rebuilt),
    and a gate patched after the first call, on the class or on the instance, is run by grouped_mm instead of the old plan."""
    module = copy.deepcopy(experts_modules(tiny_model("gpt_oss"))[0])
    hidden, ids, weights = routing_inputs(9, module.num_experts, torch.float32)
    smt.experts_forward(module, hidden, ids, weights)
    module.limit, module.alpha = 2.5, 1.3  # gate_gain 3 puts many gate/up values past 2.5
    out = smt.experts_forward(module, hidden, ids, weights)
    assert rel_err(out, float64_eager(module, hidden, ids, weights)) < TOLERANCE[torch.float32]

    def squared_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return gate * gate * up

    def float64_squared_gate(module, hidden, ids, weights):
        out = torch.zeros(hidden.shape, dtype=torch.float64)
        for t in range(hidden.shape[0]):
            for k in range(ids.shape[1]):
                gate, up = (module.gate_up_proj[ids[t, k]].double().cpu() @ hidden[t].double()).chunk(2)
                out[t] += weights[t, k].double() * (module.down_proj[ids[t, k]].double().cpu() @ (gate * gate * up))
        return out

    base = type(experts_modules(tiny_model("qwen3_moe"))[0])
    patched_class = type("PatchedLaterExperts", (base,), {})
    for where in ("instance", "class"):
        module = copy.copy(experts_modules(tiny_model("qwen3_moe"))[0])
        module.__class__ = patched_class
        hidden, ids, weights = routing_inputs(6, EXPERTS, torch.float32)
        with torch.no_grad():
            smt.experts_forward(module, hidden, ids, weights)  # plans the default gate
            if where == "instance":
                module._apply_gate = types.MethodType(squared_gate, module)
            else:
                patched_class._apply_gate = squared_gate
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = smt.experts_forward(module, hidden, ids, weights)
            assert rel_err(out.cpu(), float64_squared_gate(module, hidden.cpu(), ids.cpu(), weights.cpu())) < 1e-5, where


def test_routing_shapes_checked_before_use():
    """Weights `[k, T]` (or ids and weights of other row counts) are refused with a ValueError naming both, not reshaped into a
    silently wrong pairing; a missing tensor is a TypeError."""
    module = experts_modules(tiny_model("qwen3_moe"))[0]
    hidden, ids, weights = routing_inputs(3, EXPERTS, torch.float32)
    with pytest.raises(ValueError, match="top_k_index, top_k_weights"):
        smt.experts_forward(module, hidden, ids, weights.T.contiguous())
    with pytest.raises(ValueError, match="top_k_index, top_k_weights"):
        smt.experts_forward(module, hidden, ids[:2], weights[:2])
    with pytest.raises(TypeError, match="top_k_weights"):
        smt.experts_forward(module, hidden, ids, None)


# ---------------------------------------------------------------------------------------------------------------------------------
# Other experts classes: custom gates we map, non-gated experts, and what falls back


# Every field any of these classes reads from its config.
UNIVERSAL_CONFIG = dict(hidden_size=HIDDEN, intermediate_size=INTER, moe_intermediate_size=INTER, num_local_experts=EXPERTS,
                        num_experts=EXPERTS, n_routed_experts=EXPERTS, hidden_act="silu", mlp_hidden_act="relu2",
                        swiglu_alpha=1.702, swiglu_limit=7.0, moe_latent_size=None, _experts_implementation="simple_moe")


def standalone_experts(model_dir, class_name, seed=5, **config_overrides):
    try:
        cls = getattr(importlib.import_module(f"transformers.models.{model_dir}.modeling_{model_dir}"), class_name)
    except (ImportError, AttributeError):
        pytest.skip(f"{class_name} not in transformers {hf.__version__}")
    module = cls(types.SimpleNamespace(**dict(UNIVERSAL_CONFIG, **config_overrides)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.1 if name.endswith("bias") else (INTER**-0.5 if name == "down_proj" else 3 * HIDDEN**-0.5)
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.to(DEVICE)


@pytest.mark.parametrize("model_dir,class_name,activation", [
    ("openai_privacy_filter", "OpenAIPrivacyFilterExperts", "swiglu_bias"),
    ("minimax_m3_vl", "MiniMaxM3VLExperts", "swiglu_bias"),
    ("deepseek_v4", "DeepseekV4Experts", "swiglu_bias"),
    ("hy_v4", "HYV4Experts", "swiglu_bias"),
    ("glm5_next", "Glm5NextTextExperts", "swiglu_bias"),
    ("beam", "BeamExperts", "swiglu"),
    ("nemotron_h", "NemotronHExperts", "relu2"),
])
def test_other_experts_classes(model_dir, class_name, activation):
    module = standalone_experts(model_dir, class_name)
    assert smt.plan_for(module).activation.name == activation
    hidden, ids, weights = routing_inputs(12, EXPERTS, torch.float32, sentinels=True)
    out = smt.experts_forward(module, hidden, ids, weights)
    assert rel_err(out, float64_eager(module, hidden, ids, weights)) < TOLERANCE[torch.float32]


def test_act_fn_mapping():
    from transformers.activations import ACT2FN

    module = copy.deepcopy(experts_modules(tiny_model("qwen3_moe"))[0])
    expected = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh"}
    for hf_name, ours in expected.items():
        module.act_fn = ACT2FN[hf_name]
        assert smt.plan_for(module).activation.name == ours, hf_name
    module.act_fn = ACT2FN["quick_gelu"]
    with pytest.raises(smt.Unsupported, match="act_fn"):
        smt.plan_for(module)


def test_unknown_gate_falls_back_to_grouped_mm_with_one_warning():
    base = type(experts_modules(tiny_model("qwen3_moe"))[0])

    class SquaredGateExperts(base):  # a user subclass with its own gate: must not be mistaken for the parent's
        def _apply_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return gate * gate * up

    module = copy.copy(experts_modules(tiny_model("qwen3_moe"))[0])
    module.__class__ = SquaredGateExperts
    hidden, ids, weights = routing_inputs(6, EXPERTS, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = smt.experts_forward(module, hidden, ids, weights)
        smt.experts_forward(module, hidden, ids, weights)
    ours = [w for w in caught if "simple_moe" in str(w.message)]
    assert len(ours) == 1 and "SquaredGateExperts" in str(ours[0].message)
    assert torch.equal(out, hf_moe.grouped_mm_experts_forward(module, hidden, ids, weights))


# ---------------------------------------------------------------------------------------------------------------------------------
# The benchmark example's code path, at a tiny size


def test_benchmark_example_tiny(tmp_path):
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "transformers_qwen3.py"
    spec = importlib.util.spec_from_file_location("transformers_qwen3_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = str(tmp_path / "bench")
    example.main(["--tiny", "--device", DEVICE, "--dtypes", "fp32", "--implementations", "simple_moe,grouped_mm",
                  "--cpu-repeats", "1", "--warmup-ms", "5", "--rep-ms", "10", "--out", out])
    report = json.loads(pathlib.Path(out + ".json").read_text())
    assert report["checks"][0]["rel_err_vs_grouped_mm"] < LOGITS_TOLERANCE[torch.float32]
    phases = {(r["implementation"], r["phase"]) for r in report["results"]}
    assert {("simple_moe", "prefill"), ("simple_moe", "decode"), ("grouped_mm", "prefill"), ("grouped_mm", "decode")} <= phases
    assert all(r["ms"] is None or r["ms"] > 0 for r in report["results"])
    assert "| prefill 1x16 |" in pathlib.Path(out + ".md").read_text()


# ---------------------------------------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_grouped_mm_bf16_gpu(name):
    """One MoE layer, so both implementations see the same routing: their bf16 logits agree within bf16's tolerance.

    (With two or more layers, bf16 rounding differences in layer 1 flip near-tied top-k choices in layer 2, and any two bf16
    implementations then differ by several percent on these random models; test_bf16_no_less_accurate_than_grouped_mm_gpu
    covers that case against an fp32 reference.)"""
    model = tiny_model(name, torch.bfloat16, layers=1)
    tokens = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    assert rel_err(logits(model, "simple_moe", tokens), logits(model, "grouped_mm", tokens)) <= LOGITS_TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_no_less_accurate_than_grouped_mm_gpu(name):
    """Two layers in bf16, each implementation against the same model's fp32 logits: ours is no further off than grouped_mm."""
    tokens = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    reference = logits(tiny_model(name), "grouped_mm", tokens)  # fp32, same weights (same seed and init)
    model = tiny_model(name, torch.bfloat16)
    ours = rel_err(logits(model, "simple_moe", tokens), reference)
    theirs = rel_err(logits(model, "grouped_mm", tokens), reference)
    print(f"{name}: bf16 vs fp32 logits: simple_moe {ours:.3e}, grouped_mm {theirs:.3e}")
    assert ours <= 1.25 * theirs + 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_decodes_on_simple_moe_gpu(monkeypatch):
    """During generate() transformers swaps only grouped_mm for decode; ours must serve every step, prefill and decode."""
    calls = []

    def counting(module, hidden_states, top_k_index, top_k_weights):
        calls.append(hidden_states.shape[0])
        return smt.experts_forward(module, hidden_states, top_k_index, top_k_weights)

    monkeypatch.setitem(hf_moe.ExpertsInterface._global_mapping, "simple_moe", counting)
    model = tiny_model("qwen3_moe", torch.bfloat16)
    model.set_experts_implementation("simple_moe")
    prompt = torch.randint(0, VOCAB, (1, 6), device=DEVICE)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    layers = len(experts_modules(model))
    assert calls[:layers] == [6] * layers and calls[layers:] == [1] * (7 * layers)
