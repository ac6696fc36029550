"""Hugging Face-style models: dict batches, a loss taken from the model's output (``outputs.loss``),
attention through ``F.scaled_dot_product_attention``. ``hvp="auto"`` must agree with the exact
math-kernel path (and with the dense float64 Hessian), also when the model pins a fused attention
kernel that has no double backward and the measurement falls back to finite differences."""

import copy
from collections import OrderedDict
from dataclasses import dataclass

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from cases import Case, dense_hessian
from lightning_models import trainer
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from benchmarks.models import LlamaStyleLM
from pf_lightning import HessianEigenMonitor, HessianOperator, hessian_eigenpairs
from pf_lightning.curvature import FiniteDifferenceFallbackWarning
from pf_lightning.measure import loss_of, output_loss

VOCAB, SEQ = 7, 6


@dataclass
class LMOutput:  # a dataclass output: the loss only as an attribute
    loss: Tensor | None
    logits: Tensor


class ModelOutput(OrderedDict):  # what transformers' ModelOutput is: a Mapping with attribute access
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


class TinyLM(nn.Module):
    """A one-block causal language model: embedding, SDPA attention, GELU MLP, LM head."""

    def __init__(self, d: int = 8, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused  # pin the CPU flash kernel (no double backward), as a fused-attention model does
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(0.1 * torch.randn(SEQ, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, VOCAB)

    def attention(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        if self.fused:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> LMOutput:
        h = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
        h = h + self.attention(self.ln1(h))
        h = h + self.mlp(self.ln2(h))
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return LMOutput(loss, logits)


def dict_batches(sizes=(10, 6), seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        ids = torch.randint(0, VOCAB, (size, SEQ), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def reference_top(model: TinyLM, batches, k: int = 1) -> Tensor:
    exact = copy.deepcopy(model)
    exact.fused = False  # the same function through the math kernel, which torch.func can differentiate
    return torch.linalg.eigvalsh(dense_hessian(Case("lm", exact, output_loss, batches))).flip(0)[:k]


def test_loss_of_reads_tensors_mappings_and_attributes():
    loss = torch.tensor(1.5)
    assert loss_of(loss) is loss
    assert loss_of({"loss": loss}) is loss
    assert loss_of(ModelOutput(loss=loss, logits=loss)) is loss
    assert loss_of(LMOutput(loss, loss)) is loss
    assert loss_of({"logits": loss}) is None and loss_of(LMOutput(None, loss)) is None
    with pytest.raises(ValueError, match="without a `loss`"):
        output_loss(TinyLM(), {"input_ids": dict_batches()[0]["input_ids"]})


def test_auto_takes_the_exact_math_kernel_path_and_matches_dense_float64():
    torch.manual_seed(0)
    model = TinyLM().double()
    batches = dict_batches()
    result = hessian_eigenpairs(model, output_loss, batches, k=2, tol=1e-9, max_hvp=600)
    assert result.info["hvp"] == "double_backward"
    torch.testing.assert_close(result.eigenvalues, reference_top(model, batches, 2), rtol=1e-7, atol=0)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_fused_attention_falls_back_to_finite_differences_within_their_bound(dtype, rtol):
    torch.manual_seed(0)
    model = TinyLM(fused=True).to(dtype)
    batches = dict_batches()
    with pytest.warns(FiniteDifferenceFallbackWarning, match="double backward does not run"):
        auto = hessian_eigenpairs(model, output_loss, batches, k=1, tol=1e-6, max_hvp=600)
    assert auto.info["hvp"] == "finite_difference"
    exact_model = copy.deepcopy(model)
    exact_model.fused = False
    exact = hessian_eigenpairs(exact_model, output_loss, batches, k=1, hvp="double_backward", tol=1e-6)
    # Central differences: relative error ~eps^(2/3) per product, 1e-10 (float64) / 5e-5 (float32).
    torch.testing.assert_close(auto.eigenvalues, exact.eigenvalues, rtol=rtol, atol=0)
    torch.testing.assert_close(auto.eigenvalues.double(), reference_top(model, batches), rtol=rtol, atol=0)


class LitLM(L.LightningModule):
    """The Hugging Face pattern: dict batches in, a ``ModelOutput`` (with ``loss``) out of training_step."""

    def __init__(self, fused: bool = True) -> None:
        super().__init__()
        self.model = TinyLM(fused=fused).double()  # float64: the finite-difference bound is 1e-6 there

    def training_step(self, batch, batch_idx):
        out = self.model(**batch)
        return ModelOutput(loss=out.loss, logits=out.logits)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_monitor_on_a_hugging_face_style_module_with_dict_batches(tmp_path):
    L.seed_everything(0)
    module = LitLM()
    data = [
        {"input_ids": b["input_ids"][i], "labels": b["labels"][i]}
        for b in dict_batches()
        for i in range(len(b["input_ids"]))
    ]
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, probe=12, tol=1e-5)
    with pytest.warns(FiniteDifferenceFallbackWarning) as record:  # records every warning
        trainer(tmp_path, max_steps=4, callbacks=[monitor]).fit(module, DataLoader(data, batch_size=8))
    assert [h["step"] for h in monitor.history] == [0, 2, 4]
    assert {h["hvp"] for h in monitor.history} == {"finite_difference"} and monitor.probe.total_weight == 12
    # The fallback is found once per fit: later measurements ask for finite differences directly
    # (they re-tried double backward before, a product and a warning each).
    assert sum(issubclass(w.category, FiniteDifferenceFallbackWarning) for w in record) == 1
    assert monitor.hvp == "auto" and monitor.hvp_in_use == "finite_difference"
    exact_model = copy.deepcopy(module.model)
    exact_model.fused = False
    exact = hessian_eigenpairs(exact_model, output_loss, monitor.probe, k=1, hvp="double_backward", tol=1e-6)
    # float64 finite differences: ~1e-10 per product; a warm-started float32 run of this test was off
    # by 3e-3 (float32 central differences of a trained transformer are noisier than at init).
    torch.testing.assert_close(monitor.latest.eigenvalues, exact.eigenvalues, rtol=1e-6, atol=0)


def _right_padded(n: int, seed: int) -> list[dict[str, Tensor]]:
    """Sequences with their last tokens padded away (label -100, which the loss ignores)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    lengths = torch.randint(2, SEQ + 1, (n,), generator=gen)
    labels = ids.masked_fill(torch.arange(SEQ) >= lengths[:, None], -100)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def test_a_token_mean_over_padded_sequences_keeps_the_loader_batches_and_measures_them_as_trained(tmp_path):
    """A mean over the tokens of padded batches weighs each batch's samples by its own token count; a
    stacked probe would pool the counts, a different objective. At initialization the two losses agree to
    4e-5 here (every token's loss is about log 7), the gradients differ by 5%: the check compares both."""
    L.seed_everything(0)
    module = LitLM(fused=False)
    at_start = copy.deepcopy(module.model)
    monitor = HessianEigenMonitor(k=1, tol=1e-10, max_hvp=600, at_fit_end=False, every_n_steps=None)
    loader = DataLoader(_right_padded(20, seed=3), batch_size=8)
    with pytest.warns(UserWarning, match="averages over the tokens of padded sequences"):
        trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(module, loader)
    assert [b["input_ids"].shape[0] for b in monitor.probe.batches] == [8, 8, 4]
    batches = list(loader)  # the sample-weighted mean of the batches' token means, as trained
    expected = reference_top(at_start, batches)
    assert monitor.history[0]["eigenvalues"][0] == pytest.approx(float(expected[0]), rel=1e-9)


def _llama(hf_casts: bool = False) -> LlamaStyleLM:
    torch.manual_seed(0)
    return LlamaStyleLM(vocab=VOCAB, d=16, n_layers=1, n_heads=2, hf_casts=hf_casts).double()


def _next_token(model: LlamaStyleLM, batch: Tensor) -> Tensor:
    return model.loss(batch)


def _token_batches() -> list[Tensor]:
    return [batch["input_ids"] for batch in dict_batches((12, 8))]


def test_finite_differences_on_a_llama_style_model_in_float64_match_double_backward():
    """Tied embeddings, RMSNorm, rotary positions, SwiGLU, all in float64: central differences at the
    default step agree with the exact eigenvalues to 1e-7 (measured: about 1e-10)."""
    model, batches = _llama(), _token_batches()
    exact = hessian_eigenpairs(
        model, _next_token, batches, k=3, hvp="double_backward", tol=1e-10, max_hvp=600
    )
    fd = hessian_eigenpairs(model, _next_token, batches, k=3, hvp="finite_difference", tol=1e-10, max_hvp=600)
    torch.testing.assert_close(fd.eigenvalues, exact.eigenvalues, rtol=1e-7, atol=0)


def test_a_loss_cast_to_float32_is_warned_and_sets_the_finite_difference_step():
    """Hugging Face's casts (RMSNorm and the logits in float32) in a float64 model: the loss comes back in
    float32, which is warned, and the step follows float32's epsilon. At float64's step (the rule before)
    the float32 rounding of the gradients, divided by a step 200 times too short, put products about 10%
    off. The eigenvalues are then as accurate as float32 finite differences: 6e-3 on this untrained
    model, whose sharp top eigenvalue (59) makes the truncation error large (BENCHMARKS.md, "Accuracy of
    finite differences": 3e-6 to 4e-4 on the pre-trained benchmark models)."""
    from pf_lightning.curvature import operator

    operator._LOWER_PRECISION_WARNED.clear()
    clean, casts = _llama(), _llama(hf_casts=True)
    batches = _token_batches()
    V = torch.randn(
        sum(p.numel() for p in clean.parameters()),
        3,
        generator=torch.Generator().manual_seed(4),
        dtype=torch.float64,
    )
    with HessianOperator(clean, _next_token, batches, hvp="double_backward") as op:
        exact = op.matmat(V)
    with pytest.warns(
        UserWarning, match="comes back in torch.float32 while the measurement runs in torch.float64"
    ):
        with HessianOperator(casts, _next_token, batches, hvp="finite_difference") as op:
            fd = op.matmat(V)
            assert op.backend.precision == torch.float32
    error = float((fd - exact).norm() / exact.norm())
    assert error < 5e-3
    top_exact = hessian_eigenpairs(clean, _next_token, batches, k=2, hvp="double_backward", tol=1e-9)
    top_fd = hessian_eigenpairs(casts, _next_token, batches, k=2, hvp="finite_difference", tol=1e-5)
    torch.testing.assert_close(top_fd.eigenvalues, top_exact.eigenvalues, rtol=1e-2, atol=0)


def _hf_model(name: str) -> nn.Module:
    """A tiny Hugging Face Llama (tied embeddings, RMSNorm, SwiGLU, grouped-query attention) or GPT-2, built
    from its config (random init, no download), trained 30 Adam steps so that its spectrum is not that of
    an untrained network."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "llama":
        config = LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True, use_cache=False,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=32,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        output_loss(model, _hf_batches()[0]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.train()


def _hf_batches() -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 64, (8, 16), generator=gen) for _ in range(2)]
    return [{"input_ids": batch, "labels": batch} for batch in ids]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_hugging_face_checkpointing_is_measured_exactly(name, reentrant):
    """``gradient_checkpointing_enable()`` on real transformers models, in both modes: ``"auto"`` stays on
    double backward (the flag is off inside the measurement) and gives the eigenvalues of the model without
    checkpointing, to float32 round-off; the flag is back on afterwards."""
    model, batches = _hf_model(name), _hf_batches()
    exact = hessian_eigenpairs(model, output_loss, batches, k=3, hvp="double_backward", tol=1e-6, max_hvp=600)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = hessian_eigenpairs(model, output_loss, batches, k=3, tol=1e-6, max_hvp=600)
    assert checkpointed.info["hvp"] == "double_backward"
    torch.testing.assert_close(checkpointed.eigenvalues, exact.eigenvalues, rtol=1e-5, atol=0)
    assert model.is_gradient_checkpointing


def test_hugging_face_llama_in_float64_warns_of_its_float32_loss_and_finite_differences_follow_it():
    """Hugging Face's Llama computes RMSNorm and the loss's logits in float32, also in a float64 model: the
    measurement says so, and finite differences, at float32's step, are as accurate as float32's allow
    (measured 1.9e-4; 6.7e-4 at float64's step, the rule before)."""
    from pf_lightning.curvature import operator

    operator._LOWER_PRECISION_WARNED.clear()
    model, batches = _hf_model("llama").double(), _hf_batches()
    with pytest.warns(
        UserWarning, match="comes back in torch.float32 while the measurement runs in torch.float64"
    ):
        exact = hessian_eigenpairs(
            model, output_loss, batches, k=3, hvp="double_backward", tol=1e-9, max_hvp=600
        )
    fd = hessian_eigenpairs(model, output_loss, batches, k=3, hvp="finite_difference", tol=1e-5, max_hvp=600)
    torch.testing.assert_close(fd.eigenvalues, exact.eigenvalues, rtol=5e-4, atol=0)
