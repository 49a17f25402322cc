"""torch.compile traces the public ops and the model without graph breaks: each op's choice of
implementation is a lookup made outside the traced code (vlfast._extension), not a dispatcher
query or a host read inside it. fullgraph=True turns any break into an error."""
import torch
import torch._dynamo
import torch.nn.functional as F

from test_mamo import batch, tiny
from vlfast.ops import attention, dropout_add_layer_norm, ema_update_, itc_loss, random_masking, unmask


def compiled_equals_eager(function, *args):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = function(*args)
    torch.manual_seed(0)
    traced = torch.compile(function, backend="eager", fullgraph=True)(*args)
    for got, want in zip(torch.utils._pytree.tree_leaves(traced), torch.utils._pytree.tree_leaves(eager)):
        torch.testing.assert_close(got, want)


def test_each_op_compiles_without_a_graph_break():
    g = torch.Generator().manual_seed(0)
    tokens, pos = torch.randn(3, 10, 8, generator=g), torch.randn(1, 10, 8, generator=g)
    compiled_equals_eager(lambda t, p: tuple(random_masking(t, 0.6, pos_embed=p)), tokens, pos)
    masking = random_masking(tokens, 0.6)
    compiled_equals_eager(lambda v, ids, token: unmask(v, ids, token, pos_embed=pos), masking.visible,
                          masking.ids_restore, torch.randn(8, generator=g))
    q, k, v = (torch.randn(2, 3, 7, 16, generator=g) for _ in range(3))
    mask = torch.arange(7) < torch.tensor([[5], [7]])
    compiled_equals_eager(lambda q, k, v, m: attention(q, k, v, key_padding_mask=m), q, k, v, mask)
    x, residual, weight, bias = torch.randn(4, 6, 32, generator=g), torch.randn(4, 6, 32, generator=g), \
        torch.randn(32, generator=g), torch.randn(32, generator=g)
    compiled_equals_eager(lambda *a: dropout_add_layer_norm(*a, 0.1, training=True), x, residual, weight, bias)
    image, text = (F.normalize(torch.randn(6, 16, generator=g), dim=-1) for _ in range(2))
    compiled_equals_eager(lambda i, t, tau: tuple(itc_loss(i, t, tau)), image, text, torch.tensor(0.07))
    target, source = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)], [torch.randn(5), torch.randn(3, 2)]
    compiled_equals_eager(lambda t, s: (ema_update_(t, s, 0.9), t)[1], [x.clone() for x in target], source)


def test_the_models_forward_is_one_graph():
    """All five objectives' forward, drawing from torch's default generator (an explicit
    torch.Generator argument still breaks the graph at each draw)."""
    model = tiny()
    images, input_ids, mask = batch()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda: model(images, input_ids, mask)["loss"])()
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
