"""One ALBEF-style pretraining step before and after swapping in vlfast, timed.

    python examples/albef_style_step.py [--batch 64] [--steps 20]

AlbefStyle keeps the structure of ALBEF's models/model_pretrain.py in a few layers: a BERT-style
attention layer over the caption with xbert's extended additive mask, projections to the
contrastive space, ITC with a learnable temperature, ITM on one hard negative per image and per
text, and the momentum update. ``queue_size`` > 0 makes the ITC ALBEF's pretraining one: keys from
the momentum projections and a queue of them, targets distilled with ``alpha``, and
``_dequeue_and_enqueue``. ``fused=False`` is their code; ``fused=True`` is the same model after the
swap that docs/porting.md describes. tests/test_porting.py checks they agree.

    python -m examples.albef_style_step [--queue 65536]
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from vlfast.nn import Attention, FeatureQueue, MomentumModel
from vlfast.ops import itc_loss, momentum_itc_loss


class AlbefStyle(nn.Module):
    def __init__(self, width: int = 256, embed_dim: int = 128, heads: int = 8, fused: bool = False,
                 queue_size: int = 0, alpha: float = 0.4):
        super().__init__()
        self.fused, self.heads, self.queue_size, self.alpha = fused, heads, queue_size, alpha
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(2 * width, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.attention = Attention()
        if fused:
            self.vision_proj_m = MomentumModel(self.vision_proj, 0.995)
            self.text_proj_m = MomentumModel(self.text_proj, 0.995)
        else:
            self.vision_proj_m = nn.Linear(width, embed_dim)
            self.text_proj_m = nn.Linear(width, embed_dim)
            self.model_pairs = [[self.vision_proj, self.vision_proj_m], [self.text_proj, self.text_proj_m]]
            self.copy_params()
        if queue_size and fused:
            self.queue = FeatureQueue(queue_size, embed_dim)
        elif queue_size:  # ALBEF's buffers
            self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
            self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def copy_params(self):  # ALBEF
        for model_pair in self.model_pairs:
            for param, param_m in zip(model_pair[0].parameters(), model_pair[1].parameters()):
                param_m.data.copy_(param.data)
                param_m.requires_grad = False

    @torch.no_grad()
    def _momentum_update(self, momentum: float = 0.995):
        if self.fused:
            self.vision_proj_m.update(self.vision_proj)
            self.text_proj_m.update(self.text_proj)
            return
        for model_pair in self.model_pairs:  # ALBEF, as written there
            for param, param_m in zip(model_pair[0].parameters(), model_pair[1].parameters()):
                param_m.data = param_m.data * momentum + param.data * (1.0 - momentum)

    def encode_text(self, text_embeds, attention_mask):
        """One self-attention layer; attention_mask in xbert's extended additive form."""
        batch, length, width = text_embeds.shape

        def heads(x):  # xbert's transpose_for_scores: (B, L, W) -> (B, H, L, W / H)
            return x.view(batch, length, self.heads, width // self.heads).permute(0, 2, 1, 3)

        q, k, v = heads(self.query(text_embeds)), heads(self.key(text_embeds)), heads(self.value(text_embeds))
        if self.fused:
            context = self.attention(q, k, v, attention_mask)
        else:  # xbert's BertSelfAttention (attention-probability dropout off)
            attention_scores = q @ k.transpose(-1, -2) / (width // self.heads) ** 0.5
            attention_scores = attention_scores + attention_mask
            attention_probs = nn.Softmax(dim=-1)(attention_scores)
            context = attention_probs @ v
        return text_embeds + context.permute(0, 2, 1, 3).reshape(batch, length, width)

    def forward(self, image_embeds, text_embeds, extended_mask, generator=None, negatives=None):
        """Returns (loss_ita, loss_itm, (neg_image_idx, neg_text_idx)); ``negatives`` forces the draw."""
        text_embeds = self.encode_text(text_embeds, extended_mask)
        image_cls, text_cls = image_embeds[:, 0, :], text_embeds[:, 0, :]
        image_feat = F.normalize(self.vision_proj(image_cls), dim=-1)
        text_feat = F.normalize(self.text_proj(text_cls), dim=-1)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        bs = image_feat.size(0)

        if self.queue_size:
            loss_ita, drawn = self.queue_itc(image_feat, text_feat, image_cls, text_cls, generator)
        elif self.fused:
            out = itc_loss(image_feat, text_feat, self.temp, generator=generator)
            loss_ita = out.loss
            drawn = (out.neg_image_idx, out.neg_text_idx)
        else:  # ALBEF: the matrix twice, both softmaxes, the per-row multinomial loop
            sim_i2t = image_feat @ text_feat.t() / self.temp
            sim_t2i = text_feat @ image_feat.t() / self.temp
            sim_targets = torch.zeros(sim_i2t.size(), device=image_feat.device)
            sim_targets.fill_diagonal_(1)
            loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_targets, dim=1).mean()
            loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_targets, dim=1).mean()
            loss_ita = (loss_i2t + loss_t2i) / 2
            drawn = albef_negatives(sim_i2t, sim_t2i, bs, generator)
        neg_image_idx, neg_text_idx = drawn if negatives is None else negatives

        # ITM on the [CLS] pairs: positives, (negative image, text), (image, negative text).
        pairs = torch.cat([
            torch.cat([image_cls, text_cls], dim=1),
            torch.cat([image_cls[neg_image_idx], text_cls], dim=1),
            torch.cat([image_cls, text_cls[neg_text_idx]], dim=1),
        ])
        itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(pairs.device)
        loss_itm = F.cross_entropy(self.itm_head(pairs), itm_labels)
        return loss_ita, loss_itm, drawn

    def queue_itc(self, image_feat, text_feat, image_cls, text_cls, generator):
        """ALBEF's pretraining ITC: momentum features (here the momentum projections of the same
        [CLS] states), the queue, momentum distillation, then the batch into the queue."""
        with torch.no_grad():
            image_feat_m = F.normalize(self.vision_proj_m(image_cls), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(text_cls), dim=-1)
        if self.fused:
            image_queue, text_queue, _ = self.queue.keys()
            out = momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.temp, alpha=self.alpha,
                                    image_queue=image_queue, text_queue=text_queue, generator=generator)
            self.queue.enqueue(image_feat_m, text_feat_m)
            return out.loss, (out.neg_image_idx, out.neg_text_idx)
        bs, alpha = image_feat.size(0), self.alpha
        with torch.no_grad():  # ALBEF, as written there
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            sim_i2t_m = image_feat_m @ text_feat_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp
            sim_targets = torch.zeros(sim_i2t_m.size()).to(image_feat.device, image_feat.dtype)
            sim_targets.fill_diagonal_(1)
            sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
            sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
        self._dequeue_and_enqueue(image_feat_m, text_feat_m)
        return (loss_i2t + loss_t2i) / 2, albef_negatives(sim_i2t, sim_t2i, bs, generator)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat, text_feat):  # ALBEF's, in one process (no all_gather)
        batch_size = image_feat.shape[0]
        ptr = int(self.queue_ptr)
        assert self.queue_size % batch_size == 0  # for simplicity
        self.image_queue[:, ptr:ptr + batch_size] = image_feat.T
        self.text_queue[:, ptr:ptr + batch_size] = text_feat.T
        ptr = (ptr + batch_size) % self.queue_size
        self.queue_ptr[0] = ptr


def albef_negatives(sim_i2t, sim_t2i, bs, generator):
    """ALBEF's ITM draw, as written there: the in-batch columns' softmax, the diagonal zeroed, one
    torch.multinomial per row. Returns (neg_image_idx, neg_text_idx)."""
    with torch.no_grad():
        weights_i2t = F.softmax(sim_i2t[:, :bs], dim=1)
        weights_i2t.fill_diagonal_(0)
        weights_t2i = F.softmax(sim_t2i[:, :bs], dim=1)
        weights_t2i.fill_diagonal_(0)
    neg_image_idx = [torch.multinomial(weights_t2i[b], 1, generator=generator).item() for b in range(bs)]
    neg_text_idx = [torch.multinomial(weights_i2t[b], 1, generator=generator).item() for b in range(bs)]
    return (torch.tensor(neg_image_idx, device=sim_i2t.device), torch.tensor(neg_text_idx, device=sim_i2t.device))


def random_batch(batch, device, dtype=torch.float32, width=256, image_tokens=17, text_tokens=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    image_embeds = torch.randn(batch, image_tokens, width, generator=g).to(device, dtype)
    text_embeds = torch.randn(batch, text_tokens, width, generator=g).to(device, dtype)
    lengths = torch.randint(5, text_tokens + 1, (batch,), generator=g)
    attention_mask = (torch.arange(text_tokens)[None, :] < lengths[:, None]).to(device, dtype)
    extended_mask = (1.0 - attention_mask[:, None, None, :]) * -10000.0  # xbert's get_extended_attention_mask
    return image_embeds, text_embeds, extended_mask


def time_steps(model, batch, steps, device):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss_ita, loss_itm, _ = model(*batch)
        optimizer.zero_grad()
        (loss_ita + loss_itm).backward()
        optimizer.step()
        model._momentum_update()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--queue", type=int, default=0, help="ALBEF's queue-based ITC with this many queued features")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        batch = random_batch(args.batch, device)
        seconds = {}
        for fused in (False, True):
            torch.manual_seed(0)
            model = AlbefStyle(fused=fused, queue_size=args.queue).to(device)
            seconds[fused] = time_steps(model, batch, args.steps, device)
        print(f"{device}: ALBEF code {seconds[False] * 1e3:.2f} ms/step, with vlfast {seconds[True] * 1e3:.2f} ms/step, "
              f"{seconds[False] / seconds[True]:.2f}x (batch {args.batch}, queue {args.queue}, {args.steps} steps)")


if __name__ == "__main__":
    main()
