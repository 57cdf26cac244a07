"""SIREN layers: Sitzmann et al.'s initialisation and the shape of the network."""

import math

import torch

from cryoace.models import SineLayer, Siren


def test_siren_initialisation_bounds():
    torch.manual_seed(0)
    net = Siren(3, 2, hidden=128, layers=3, omega_0=30.0)
    first = net.body[0].linear.weight
    assert first.abs().max() <= 1 / 3 and first.abs().max() > 0.9 / 3
    bound = math.sqrt(6 / 128) / 30
    for layer in list(net.body)[1:]:
        w = layer.linear.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # uniform: std = bound/√3
    assert net.head.weight.abs().max() <= bound
    assert len(net.body) == 4 and net.head.out_features == 2


def test_sine_layer_and_activation_statistics():
    torch.manual_seed(0)
    layer = SineLayer(4, 8, omega_0=2.0)
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer(x), torch.sin(2.0 * layer.linear(x)))
    # Through depth the activations keep a spread (neither collapse nor saturate): the point of the init
    net = Siren(3, 2, hidden=256, layers=4, omega_0=30.0)
    h = torch.rand(4096, 3) * 2 - 1
    for block in net.body:
        h = block(h)
        assert 0.5 < h.std().item() < 0.9  # arcsine distribution on [-1, 1]: std 1/√2
