"""The hand-fused inference pass (paraisite.screening.fused) against the megnet_pt layer each stacked layer rewrites.

Two models of different weights are stacked, and every stacked layer must give, for each of them, what the
plain megnet_pt (or ParAIsite) layer gives: a change to a megnet_pt layer that is not mirrored in fused.py
fails here, at the layer that differs.
"""
import pytest
import torch
from torch_geometric.data import Batch

from megnet_pt import MEGNet
from paraisite.screening import fused
from paraisite.data.datasets import load_dataset
from paraisite.model import ParAIsite

from conftest import working_folder

TOL = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(scope="module")
def setting(tmp_path_factory, shared):
    with working_folder(tmp_path_factory.mktemp("fused"), threads=1):
        data = load_dataset("togo15")
        batch = Batch.from_data_list(data.graphs[:12])
        models = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            models.append(ParAIsite(MEGNet()).eval())
        yield models, batch, fused.GraphIndex.build(batch)


def stacked(per_model: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(per_model)


def test_mlps(setting):
    models, _, _ = setting
    for name in ("edge_encoder", "node_encoder", "state_encoder"):
        mlps = [getattr(m.megnet, name) for m in models]
        width = mlps[0].layers[0].in_features
        x = torch.randn(2, 7, width)
        out = fused.StackedMLP(mlps)(x.clone())
        for m, mlp in enumerate(mlps):
            torch.testing.assert_close(out[m], mlp(x[m]), **TOL, msg=name)


def test_blocks(setting):
    models, batch, g = setting
    blocks_in = []
    with torch.no_grad():
        for m in models:
            v = m.megnet.node_encoder(m.megnet.node_embedding(batch.node_type))
            e = m.megnet.edge_encoder(m.megnet.distance_expansion(batch.edge_dist))
            u = m.megnet.state_encoder(batch.state)
            blocks_in.append((e, v, u))
        e, v, u = (stacked([b[i] for b in blocks_in]) for i in range(3))
        for b in range(len(models[0].megnet.blocks)):
            layer = fused.StackedBlock([m.megnet.blocks[b] for m in models])
            e2, v2, u2 = layer(e.clone(), v.clone(), u.clone(), g)
            for m, model in enumerate(models):
                ref = model.megnet.blocks[b](v[m], batch.edge_index, e[m], u[m], batch.batch)
                for got, want, what in zip((e2[m], v2[m], u2[m]), ref, ("edges", "nodes", "state")):
                    torch.testing.assert_close(got, want, **TOL, msg=f"block {b} {what}")
            e, v, u = e2, v2, u2


def test_set2set(setting):
    models, batch, g = setting
    x = torch.randn(2, batch.num_nodes, models[0].megnet.config.hidden_conv[-1])
    with torch.no_grad():
        out = fused.StackedSet2Set([m.megnet.node_set2set for m in models])(x, g.batch, g.num_graphs)
        for m, model in enumerate(models):
            torch.testing.assert_close(out[m], model.megnet.node_set2set(x[m], g.batch, dim_size=g.num_graphs), **TOL)


def test_trunk_head_and_the_whole_pass(setting):
    models, batch, g = setting
    with torch.no_grad():
        features = fused.StackedMEGNet([m.megnet for m in models])(g)
        heads = fused.StackedHead([m.head for m in models])(features)
        whole = fused.FusedParAIsite(models)(batch)
        for m, model in enumerate(models):
            torch.testing.assert_close(features[m], model.features(batch), **TOL)
            torch.testing.assert_close(heads[m], model(batch), **TOL)
            torch.testing.assert_close(whole[m], model(batch), **TOL)
        eform = fused.FusedEform(models[0].megnet)(batch)
        torch.testing.assert_close(eform, models[0].megnet(batch).prediction, **TOL)
