"""Decoder queries: positions relative to the input view, geometry, sin-cos embedding."""

import math

import pytest
import torch

from m3i.models.decoder import Decoder, grid_coords, sincos_embedding, view_to_view

G = 4
GRID = (G, G)


def sincos_by_hand(y: float, x: float, dim: int) -> list[float]:
    """MAE's 2-D sine-cosine embedding of one point: sin, cos of y, then of x, at the
    frequencies 1 / 10000^(k / (dim / 4))."""
    quarter = dim // 4
    values = []
    for fn, value in ((math.sin, y), (math.cos, y), (math.sin, x), (math.cos, x)):
        values += [fn(value / 10000 ** (k / quarter)) for k in range(quarter)]
    return values


def decoder(dim: int = 16, random_geometry: bool = True) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(encoder_dim=12, dim=dim, depth=1, heads=2).eval()
    if random_geometry:
        with torch.no_grad():
            model.geometry.weight.normal_()
    return model


def test_grid_coords_are_patch_centres_row_major():
    coords = grid_coords((2, 3))
    expected = [[r + 0.5, c + 0.5] for r in range(2) for c in range(3)]
    assert coords.tolist() == expected


@pytest.mark.parametrize("n", [1, 2, 3])
def test_pure_shift_gives_shifted_input_embeddings(n):
    shifts = [(1, 2), (-1, 0), (0, -3)][:n]
    size = 0.5
    input_box = torch.tensor([[0.3, 0.25, size, size]] * n)
    step = size / G  # one input-view patch, as a fraction of the image
    target_box = torch.tensor(
        [[0.3 + dy * step, 0.25 + dx * step, size, size] for dy, dx in shifts]
    )
    no_flip = torch.zeros(n, dtype=torch.bool)
    coords, geometry = view_to_view(GRID, target_box, no_flip, input_box, no_flip)
    assert coords.shape == (n, G * G, 2) and geometry.shape == (n, 3)
    torch.testing.assert_close(geometry, torch.zeros(n, 3), atol=1e-6, rtol=0)

    model = decoder()
    assert model.geometry.weight.abs().sum() > 0
    queries = model.query_embedding(coords, geometry)
    for i, (dy, dx) in enumerate(shifts):
        for r in range(G):
            for c in range(G):
                p = r * G + c
                expected_coords = torch.tensor([r + dy + 0.5, c + dx + 0.5])
                torch.testing.assert_close(coords[i, p], expected_coords, atol=1e-5, rtol=0)
                # the embedding of the input patch centre (r + dy, c + dx) + 0.5, on or off grid
                shifted = torch.tensor(sincos_by_hand(r + dy + 0.5, c + dx + 0.5, model.dim))
                torch.testing.assert_close(queries[i, p], shifted, atol=1e-5, rtol=0)


def test_identity_view_has_input_coords_and_zero_geometry():
    box = torch.tensor([[0.1, 0.2, 0.7, 0.4]])
    for flip in (False, True):
        flips = torch.tensor([flip])
        coords, geometry = view_to_view(GRID, box, flips, box, flips)
        centres = [[r + 0.5, c + 0.5] for r in range(G) for c in range(G)]
        torch.testing.assert_close(coords[0], torch.tensor(centres), atol=1e-5, rtol=0)
        torch.testing.assert_close(geometry, torch.zeros(1, 3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_flipped_copy_mirrors_columns(n):
    box = torch.tensor([[0.1, 0.2, 0.6, 0.6]] * n)
    input_flip = torch.tensor([False, True, False][:n])
    target_flip = ~input_flip
    coords, geometry = view_to_view(GRID, box, target_flip, box, input_flip)
    for i in range(n):
        for r in range(G):
            for c in range(G):
                expected = torch.tensor([r + 0.5, (G - 1 - c) + 0.5])
                torch.testing.assert_close(coords[i, r * G + c], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(geometry, torch.tensor([[0.0, 0.0, 1.0]] * n), atol=1e-6, rtol=0)


def test_zoom_out_has_spacing_two_and_log2_geometry():
    input_box = torch.tensor([[0.25, 0.25, 0.5, 0.5]])
    target_box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # twice as large, same centre
    no_flip = torch.zeros(1, dtype=torch.bool)
    coords, geometry = view_to_view(GRID, target_box, no_flip, input_box, no_flip)
    # target patch r's centre is at image y = (r + 0.5) / G, i.e. input-view units
    # ((r + 0.5) / G - 0.25) / 0.5 * G = 2r + 1 - G / 2
    for r in range(G):
        for c in range(G):
            expected = torch.tensor([2 * r + 1 - G / 2, 2 * c + 1 - G / 2])
            torch.testing.assert_close(coords[0, r * G + c], expected, atol=1e-5, rtol=0)
    grid = coords[0].reshape(G, G, 2)
    torch.testing.assert_close(grid[1:, :, 0] - grid[:-1, :, 0], torch.full((G - 1, G), 2.0))
    torch.testing.assert_close(grid[:, 1:, 1] - grid[:, :-1, 1], torch.full((G, G - 1), 2.0))
    log2 = math.log(2)
    torch.testing.assert_close(geometry, torch.tensor([[log2, log2, 0.0]]))


def test_flipped_input_and_smaller_shifted_target_by_hand():
    """Input view: top 0.2, left 0.1, 0.5 x 0.4 of the image, flipped; target view: top 0.3,
    left 0.2, 0.25 x 0.2, not flipped. Target patch (r, c) has its centre at image
    x = 0.2 + (c + 0.5) / 4 * 0.2, y = 0.3 + (r + 0.5) / 4 * 0.25; in the input view
    u = 1 - (x - 0.1) / 0.4 (flipped), v = (y - 0.2) / 0.5, times 4 patches."""
    input_box, input_flip = torch.tensor([[0.2, 0.1, 0.5, 0.4]]), torch.tensor([True])
    target_box, target_flip = torch.tensor([[0.3, 0.2, 0.25, 0.2]]), torch.tensor([False])
    coords, geometry = view_to_view(GRID, target_box, target_flip, input_box, input_flip)
    # (0, 0): x = 0.225, y = 0.33125 -> u = 1 - 0.3125, v = 0.2625 -> (1.05, 2.75)
    # (3, 2): x = 0.325, y = 0.51875 -> u = 1 - 0.5625, v = 0.6375 -> (2.55, 1.75)
    # (1, 3): x = 0.375, y = 0.39375 -> u = 1 - 0.6875, v = 0.3875 -> (1.55, 1.25)
    for (r, c), expected in {
        (0, 0): [1.05, 2.75],
        (3, 2): [2.55, 1.75],
        (1, 3): [1.55, 1.25],
    }.items():
        torch.testing.assert_close(coords[0, r * G + c], torch.tensor(expected), atol=1e-5, rtol=0)
    # half the height, half the width, flipped relative to the input
    half = math.log(0.5)
    torch.testing.assert_close(geometry, torch.tensor([[half, half, 1.0]]))


def test_anisotropic_scale_geometry():
    input_box = torch.tensor([[0.0, 0.0, 0.4, 0.8]])
    target_box = torch.tensor([[0.0, 0.0, 0.2, 0.8]])
    no_flip = torch.zeros(1, dtype=torch.bool)
    _, geometry = view_to_view(GRID, target_box, no_flip, input_box, no_flip)
    torch.testing.assert_close(geometry, torch.tensor([[math.log(0.5), 0.0, 0.0]]))


@pytest.mark.parametrize("dim", [4, 8, 16])
def test_sincos_embedding_brute_force(dim):
    coords = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0], [7.0, 5.0]])
    emb = sincos_embedding(coords, dim)
    for i, (y, x) in enumerate(coords.tolist()):
        expected = torch.tensor(sincos_by_hand(y, x, dim))
        torch.testing.assert_close(emb[i], expected, atol=1e-6, rtol=1e-6)


def test_sincos_embedding_rejects_dim_not_multiple_of_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_embedding(torch.zeros(1, 2), 6)


def test_query_embedding_adds_linear_geometry():
    """Query embedding = sin-cos of its coords + a linear map of the view's geometry, by hand:
    with weight[j] = (j, 1, -2) the geometry (0.3, -0.2, 1) adds 0.3 j - 0.2 - 2 to entry j."""
    model = decoder()
    with torch.no_grad():
        model.geometry.weight.copy_(torch.tensor([[float(j), 1.0, -2.0] for j in range(model.dim)]))
    coords = torch.tensor([[[0.5, 1.5], [2.25, 0.0]], [[3.5, 3.5], [1.0, 2.0]]])
    geometry = torch.tensor([[0.3, -0.2, 1.0], [0.0, 0.0, 0.0]])
    emb = model.query_embedding(coords, geometry)
    for i in range(2):
        added = [0.3 * j - 2.2 for j in range(model.dim)] if i == 0 else [0.0] * model.dim
        for q in range(2):
            y, x = coords[i, q].tolist()
            expected = [s + a for s, a in zip(sincos_by_hand(y, x, model.dim), added, strict=True)]
            torch.testing.assert_close(emb[i, q], torch.tensor(expected), atol=1e-5, rtol=1e-5)
            without = model.query_embedding(coords, None)[i, q]  # no geometry: identity view
            torch.testing.assert_close(without, torch.tensor(sincos_by_hand(y, x, model.dim)))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_decoder_forward_shape_and_query_dependence(n):
    model = decoder()
    g = torch.Generator().manual_seed(n)
    tokens = torch.randn(n, 6, 12, generator=g)
    token_coords = torch.rand(n, 6, 2, generator=g) * G
    query_coords = torch.rand(n, 5, 2, generator=g) * G
    out = model(tokens, token_coords, query_coords)
    assert out.shape == (n, 5, model.dim)
    assert torch.isfinite(out).all()
    moved = query_coords.clone()
    moved[:, 0] += 1.0
    assert not torch.allclose(model(tokens, token_coords, moved)[:, 0], out[:, 0], atol=1e-4)
    geometry = torch.ones(n, 3)
    assert not torch.allclose(model(tokens, token_coords, query_coords, geometry), out, atol=1e-4)


def test_decoder_tokens_travel_with_their_coords():
    """Permuting tokens together with their coords changes nothing; tokens alone does."""
    model = decoder()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 6, 12, generator=g)
    token_coords = torch.rand(2, 6, 2, generator=g) * G
    query_coords = torch.rand(2, 3, 2, generator=g) * G
    out = model(tokens, token_coords, query_coords)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    together = model(tokens[:, perm], token_coords[:, perm], query_coords)
    torch.testing.assert_close(together, out, atol=1e-5, rtol=1e-5)
    alone = model(tokens[:, perm], token_coords, query_coords)
    assert not torch.allclose(alone, out, atol=1e-4)


# ------------------------------------------------- SiameseIM's decoder (decoder.norm=batch)


def batch_norm_by_hand(x: torch.Tensor, bn: torch.nn.BatchNorm1d) -> torch.Tensor:
    """SiameseIM's PermuteBN in training mode: per channel, over every token of every sample,
    biased variance, eps 1e-5, then the affine weight and bias."""
    flat = x.reshape(-1, x.shape[-1])
    mean, var = flat.mean(dim=0), flat.var(dim=0, unbiased=False)
    return (x - mean) / torch.sqrt(var + 1e-5) * bn.weight + bn.bias


def block_by_hand(x: torch.Tensor, block, heads: int) -> torch.Tensor:
    """models_vit.Block with norm_layer=PermuteBN: x + attn(BN(x)), then x + mlp(BN(x));
    attention with a qkv bias, softmax(q k^T / sqrt(d)) v, then its projection; GELU MLP."""
    n, length, dim = x.shape
    h = batch_norm_by_hand(x, block.norm1.bn)
    qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = qkv.reshape(n, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(n, length, dim)
    x = x + attended @ block.attn.proj.weight.T + block.attn.proj.bias
    h = batch_norm_by_hand(x, block.norm2.bn)
    hidden = torch.nn.functional.gelu(h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    return x + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


def siameseim_decoder(dim: int = 16, heads: int = 2) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(12, dim, depth=2, heads=heads, norm="batch", projector_depth=2, qkv_bias=True)
    with torch.no_grad():  # BatchNorm's affine parameters start at 1 and 0: make them matter
        for name, param in model.named_parameters():
            if ".norm" in name:
                param.normal_()
    return model.train()


def test_siameseim_decoder_layers_are_the_originals():
    """models_sim.py with loss_type sim: decoder_embed, projector_decoder_blocks and
    predictor_decoder_blocks (Block(dim, heads, 4, qkv_bias=True, norm_layer=PermuteBN)), no
    decoder norm (decoder_pred follows the last block); per block 2 BatchNorms (2 x 2d
    parameters), qkv 3d^2 + 3d, proj d^2 + d, MLP 4d^2 + 4d and 4d^2 + d."""
    model, dim = siameseim_decoder(), 16
    assert len(model.projector) == 2 and len(model.blocks) == 2
    assert isinstance(model.norm, torch.nn.Identity)
    for block in [*model.projector, *model.blocks]:
        for norm in (block.norm1, block.norm2):
            assert isinstance(norm.bn, torch.nn.BatchNorm1d) and norm.bn.num_features == dim
        assert block.attn.qkv.bias is not None
        assert sum(p.numel() for p in block.parameters()) == 12 * dim**2 + 13 * dim
    default = Decoder(12, dim, depth=2, heads=2)  # m3i's: LayerNorm, no projector, no qkv bias
    assert len(default.projector) == 0 and isinstance(default.norm, torch.nn.LayerNorm)
    assert default.blocks[0].attn.qkv.bias is None
    assert isinstance(default.blocks[0].norm1, torch.nn.LayerNorm)


@pytest.mark.parametrize("n", [1, 3])
def test_siameseim_decoder_forward_is_the_originals_by_hand(n):
    """forward_sim: embed, projector on the visible tokens, then their positions, the mask
    tokens with theirs, the predictor over both, no final norm; BatchNorm statistics over all
    tokens of the batch."""
    model = siameseim_decoder()
    tokens = torch.randn(n, 5, 12)
    token_coords = torch.rand(n, 5, 2) * G
    query_coords = torch.rand(n, 7, 2) * G
    geometry = torch.randn(n, 3)
    with torch.no_grad():
        model.geometry.weight.normal_()
        got = model(tokens, token_coords, query_coords, geometry)
        x = tokens @ model.embed.weight.T + model.embed.bias
        for block in model.projector:
            x = block_by_hand(x, block, heads=2)
        x = x + torch.tensor([[sincos_by_hand(*p.tolist(), 16) for p in r] for r in token_coords])
        queries = torch.tensor([[sincos_by_hand(*p.tolist(), 16) for p in r] for r in query_coords])
        queries = queries + model.mask_token + (geometry @ model.geometry.weight.T)[:, None]
        h = torch.cat([x, queries], dim=1)
        for block in model.blocks:
            h = block_by_hand(h, block, heads=2)
    torch.testing.assert_close(got, h[:, 5:], atol=1e-5, rtol=1e-5)


def test_token_batch_norm_runs_in_float32_under_autocast():
    model = siameseim_decoder()
    x = torch.randn(2, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.blocks[0].norm1(x.bfloat16())
    assert out.dtype == torch.float32
    expected = batch_norm_by_hand(x.bfloat16().float(), model.blocks[0].norm1.bn)
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)
