"""The fast step (megnet_pt.fast): its written-out backward against autograd."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from megnet_pt import MEGNet, structure_to_graph
from megnet_pt.fast import ACTIVATIONS, fast_ops, set_fast
from megnet_pt.model import collate
from paraisite.model import ParAIsite, published_megnet


def _params(dims: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for a, b in zip(dims[:-1], dims[1:]):
        out += [torch.randn(b, a, generator=g, dtype=torch.float64, requires_grad=True),
                torch.randn(b, generator=g, dtype=torch.float64, requires_grad=True)]
    return out


@pytest.mark.parametrize("activation", ["softplus2", "relu"])
@pytest.mark.parametrize("activate_last,activate_input", [(True, False), (False, False), (True, True)])
def test_mlp_function_passes_gradcheck(activation: str, activate_last: bool, activate_input: bool) -> None:
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    params = _params([5, 6, 4, 3])
    code = ACTIVATIONS.index(activation)
    assert torch.autograd.gradcheck(lambda x, *p: fast_ops().mlp(x, list(p), code, activate_last, activate_input),
                                    (x, *params))


def test_float32_softplus2_kernel_matches_torch() -> None:
    """The float32 kernel (its own exponential and logarithm) against torch's softplus and sigmoid, and its slope
    as the backward reads it: the gradient of sum(MLP) through one activated layer of identity weights."""
    z = torch.cat([torch.linspace(-90, 90, 20001), torch.randn(10000) * 3, torch.tensor([0.0, -0.0, 1e-8, -1e-8])])
    want = torch.nn.functional.softplus(z.double()) - math.log(2.0)
    torch.testing.assert_close(fast_ops().softplus2(z).double(), want, rtol=2e-7, atol=2e-7)
    x = z.view(-1, 1).requires_grad_()
    one, zero = torch.ones(1, 1), torch.zeros(1)
    fast_ops().mlp(x, [one, zero], 0, True, False).sum().backward()
    torch.testing.assert_close(x.grad.view(-1).double(), torch.sigmoid(z.double()), rtol=1e-6, atol=1e-7)


def test_fast_model_has_the_plain_models_outputs_and_gradients(shared) -> None:
    from pymatgen.core import Structure

    from paraisite.data.datasets import dataset_folder, read_labels

    folder = dataset_folder("togo15")
    ids = read_labels(folder / "labels.csv")[0][:6]
    torch.manual_seed(0)
    plain = ParAIsite(MEGNet()).double()
    fast = set_fast(copy.deepcopy(plain))
    batch = collate([structure_to_graph(Structure.from_file(folder / "cif" / f"{i}.cif")) for i in ids])
    batch.edge_dist, batch.state = batch.edge_dist.double(), batch.state.double()
    grads = []
    for model in (plain, fast):
        out = model(batch)
        (out ** 2).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-9, atol=1e-9)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-7, atol=1e-9, msg=name)


def test_conv_function_passes_gradcheck() -> None:
    """The whole MEGNetConv node in float64 on a small graph of two crystals, one atom with no incoming edge."""
    from megnet_pt.conv import MEGNetConv
    from megnet_pt.fast import graph_index

    torch.manual_seed(0)
    conv = MEGNetConv(dim_edge=3, dim_node=4, dim_state=2, hidden=(5, 3)).double()
    edge_index = torch.tensor([[0, 1, 1, 2, 3, 4, 4], [1, 0, 2, 1, 4, 3, 4]])  # atom 0..2: crystal 0; 3..5: crystal 1
    batch = torch.tensor([0, 0, 0, 1, 1, 1])  # atom 5 has no incoming edge
    index = graph_index(edge_index, batch, 6, 2, torch.float64)
    x, e, u = (torch.randn(n, d, dtype=torch.float64, requires_grad=True) for n, d in ((6, 4), (7, 3), (2, 2)))
    params = [p for mlp in (conv.edge_mlp, conv.node_mlp, conv.state_mlp) for lin in mlp.linears()
              for p in (lin.weight, lin.bias)]

    def fast(x, e, u, *p):
        return fast_ops().conv(x, e, u, list(p), list(index), [2, 2, 2])

    assert torch.autograd.gradcheck(fast, (x, e, u, *params))
    for got, want in zip(fast(x, e, u, *params), conv(x, edge_index, e, u, batch)):  # and the plain module's function
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # inference: nothing saved for a backward, the same outputs
        for got, want in zip(fast(x, e, u, *params), conv(x, edge_index, e, u, batch)):
            assert not got.requires_grad
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fast_float32_gradients_match_the_plain_ones_on_a_real_batch(shared) -> None:
    """In float32, as it trains: every parameter's gradient within float32 round-off of the plain step's."""
    from pymatgen.core import Structure

    from paraisite.data.datasets import dataset_folder, read_labels

    folder = dataset_folder("aflow_agl")
    structures = (Structure.from_file(folder / "cif" / f"{i}.cif") for i in read_labels(folder / "labels.csv")[0])
    # compounds: in a cell of one element every atom is alike, and a gather of the wrong end would go unseen
    graphs = [structure_to_graph(s) for s in itertools.islice((s for s in structures if len(s.composition) >= 2), 8)]
    torch.manual_seed(1)
    plain = ParAIsite(published_megnet())  # trained weights: a random MEGNet's outputs hardly depend on its input
    fast = set_fast(copy.deepcopy(plain))
    batch = collate(graphs)
    grads, outputs = [], []
    for model in (plain, fast):
        out = model(batch)
        out.pow(2).sum().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    for name, g in grads[0].items():
        assert (grads[1][name] - g).norm() <= 1e-4 * g.norm() + 1e-6, name


def test_a_failed_compile_is_a_clear_error(monkeypatch) -> None:
    import torch.utils.cpp_extension

    from megnet_pt import fast

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(fast, "_ops", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with pytest.raises(RuntimeError, match=r"fast step needs its C\+\+ operators .* Install a C\+\+ compiler"):
        fast.fast_ops()
