"""Spectra per named parameter group: each group's eigenvalues are those of its diagonal block of the
dense float64 Hessian, through a real Lightning fit of a small transformer."""

import fnmatch

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from cases import Case, dense_hessian
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pf_lightning import EdgeOfStabilityMonitor, HessianEigenMonitor, hessian_eigenpairs
from pf_lightning.curvature.groups import parameter_groups


class TinyTransformer(L.LightningModule):
    """Embedding, two encoder blocks (GELU: smooth, see tests/cases.py) and a classifier head, float64."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, activation="gelu", batch_first=True)
            for _ in range(2)
        )
        self.head = nn.Linear(4, 3)
        self.double()

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, 3, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (20,), generator=gen)


def block_eigenvalues(model, H, patterns, k):
    """Top-k eigenvalues of the diagonal block of the dense Hessian ``H`` over ``patterns``."""
    index, start = [], 0
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            index.extend(range(start, start + p.numel()))
        start += p.numel()
    block = H[index][:, index]
    return torch.linalg.eigvalsh(block).flip(0)[:k]


def test_parameter_groups_name_the_blocks():
    groups = parameter_groups(TinyTransformer(), depth=2)
    assert list(groups) == ["embed.weight", "embed.bias", "blocks.0", "blocks.1", "head.weight", "head.bias"]
    assert groups["blocks.1"] == ["blocks.1.*"]
    assert list(parameter_groups(TinyTransformer())) == ["embed", "blocks", "head"]


def test_each_group_measures_its_diagonal_block_of_the_hessian(tmp_path):
    L.seed_everything(0)
    model = TinyTransformer()
    x, y = data()
    probe = [(x[:12], y[:12]), (x[12:], y[12:])]  # uneven: weighted by sample count
    groups = {name: p for name, p in parameter_groups(model, depth=2).items() if name.startswith("blocks")}
    groups["attention"] = ["blocks.*.self_attn.*"]
    monitors = HessianEigenMonitor.per_group(
        groups, k=2, every_n_steps=None, at_fit_start=False, probe=probe, tol=1e-8, max_hvp=600
    )
    full = HessianEigenMonitor(k=2, every_n_steps=None, at_fit_start=False, probe=probe, tol=1e-8)
    eos = EdgeOfStabilityMonitor()
    t = trainer(tmp_path, max_steps=3, callbacks=[*monitors, full, eos])
    t.fit(model, DataLoader(TensorDataset(x, y), batch_size=10))
    assert eos.monitor is full  # the whole Hessian's sharpness, never a group's
    assert all(m.probe is monitors[0].probe for m in monitors)  # one probe set for all groups
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    H = dense_hessian(Case("transformer", model, loss, probe))  # float64, at the final weights
    for monitor in monitors:
        want = block_eigenvalues(model, H, groups[monitor.name], 2)
        torch.testing.assert_close(monitor.latest.eigenvalues, want, rtol=1e-7, atol=0)
        assert f"hessian/{monitor.name}/eig_1" in t.callback_metrics
    whole = block_eigenvalues(model, H, ["*"], 2)
    torch.testing.assert_close(full.latest.eigenvalues, whole, rtol=1e-7, atol=0)
    # Cauchy interlacing: a diagonal block's top eigenvalue is at most the whole Hessian's.
    assert all(float(m.latest.eigenvalues[0]) <= float(whole[0]) for m in monitors)


def test_per_group_configuration_errors(tmp_path):
    with pytest.raises(MisconfigurationException, match="do not pass"):
        HessianEigenMonitor.per_group({"a": "blocks.*"}, name="x")
    with pytest.raises(MisconfigurationException, match="non-empty"):
        HessianEigenMonitor.per_group({})
    monitors = HessianEigenMonitor.per_group({"head": "head.*"}, k=1)
    assert monitors[0].params == "head.*" and monitors[0].name == "head"
    with pytest.raises(MisconfigurationException, match="without `params`"):
        x, y = data()
        trainer(tmp_path, max_steps=1, callbacks=[*monitors, EdgeOfStabilityMonitor()]).fit(
            TinyTransformer(), DataLoader(TensorDataset(x, y), batch_size=10)
        )


def test_a_compiled_module_is_grouped_and_measured_by_its_original_names():
    """torch.compile's wrapper prefixes every name with `_orig_mod.`, which neither Lightning (it measures the
    original module) nor hessian_eigenpairs (now unwrapping it) sees: `per_group(parameter_groups(compiled))`
    stopped at set-up, and `params="0.*"` matched nothing in the one-call API."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    compiled = torch.compile(model, backend="eager")
    assert parameter_groups(compiled) == parameter_groups(model) == {"0": ["0.*"], "2": ["2.*"]}
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)

    def mse(module, batch):
        return ((module(batch[0]) - batch[1]) ** 2).mean()

    want = hessian_eigenpairs(model, mse, [(x, y)], k=2, params="0.*", tol=1e-8)
    got = hessian_eigenpairs(compiled, mse, [(x, y)], k=2, params="0.*", tol=1e-8)
    torch.testing.assert_close(got.eigenvalues, want.eigenvalues, rtol=1e-12, atol=0)


class _Tied(nn.Module):
    """An embedding whose weight the output head shares (GPT-2's lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.mix, self.head = nn.Embedding(5, 3), nn.Linear(3, 3), nn.Linear(3, 5)
        self.head.weight = self.embed.weight  # (5, 3): tied

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_a_tied_parameter_is_matched_by_any_of_its_names():
    """GPT-2's lm_head.weight is transformer.wte.weight, listed once under that name: params="lm_head.*"
    matched no parameter (an outside trial). Any of its names selects it; the block is the dense one."""
    model = _Tied().double()
    tokens, targets = torch.randint(0, 5, (12,)), torch.randint(0, 5, (12,))

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    result = hessian_eigenpairs(model, loss, (tokens, targets), k=2, params="head.*", tol=1e-10)
    assert result.eigenvectors.shape[0] == 5 * 3 + 5  # the shared weight once, and the head's bias
    shared, bias = model.embed.weight, model.head.bias

    def block(w, b):
        return F.cross_entropy(F.linear(torch.tanh(model.mix(F.embedding(tokens, w))), w, b), targets)

    H = torch.autograd.functional.hessian(block, (shared.detach(), bias.detach()))
    n, m = shared.numel(), bias.numel()
    dense = torch.cat(
        [
            torch.cat([H[0][0].reshape(n, n), H[0][1].reshape(n, m)], 1),
            torch.cat([H[1][0].reshape(m, n), H[1][1].reshape(m, m)], 1),
        ]
    )
    expected = torch.linalg.eigvalsh(dense).flip(0)[:2]
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-8, atol=1e-10)
