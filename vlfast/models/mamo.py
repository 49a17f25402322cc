"""MAMO-style masked multimodal model: ViT image encoder, BERT text encoder and fusion layers,
an EMA target network, and the five objectives of docs/design.md (MRM, MIM, MLM, ITC, ITM).

Fusion gives outputs at text and at image positions: the text stream is ALBEF's (text tokens
attend to each other and cross-attend to the image tokens); the image stream runs the same
fusion layers with the roles swapped (image tokens attend to each other and cross-attend to the
text), so masked image positions have fused representations for MRM and MIM without a second
stack of weights. That needs equal image and text widths (ViT-B and BERT-base: 768).

Positions in the image stream: the fusion layers add no position embedding and attention does not
see order, so every image token entering the image stream gets the image encoder's own position
embedding (``visual_encoder.pos_embed``, [CLS] included) added once more, as MAE's decoder adds
its position embeddings after putting the mask tokens back. In the masked view I' the mask tokens
are otherwise identical: without it every masked patch of an image leaves fusion as the same
vector, and MIM and the image half of MRM could only learn each image's mean target. The target
network's image stream adds its own (EMA) copy of the same table, so both streams see one kind of
input. The encoder's table is reused rather than a new one because it is pretrained with the ViT
and averaged into the target with it.

The target network runs in eval mode by default (``target_dropout=False``): MRM and MIM regress
onto its outputs, and dropout there would make each target a random draw around another mean (the
squared error is then minimised by the dropped-out targets' mean, the L1 error by their median,
neither the network's output) and every gradient noisier. ALBEF's momentum encoders, by contrast,
run in train mode; ``target_dropout=True`` does that.
"""
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vlfast.data.text import mask_tokens
from vlfast.models.bert import BertForMaskedLM, BertModel, ContextCache, TextConfig
from vlfast.models.init import init_weights
from vlfast.models.vit import VisionConfig, VisionTransformer
from vlfast.nn import FeatureQueue, MomentumModel
from vlfast.ops import itc_loss, momentum_itc_loss, unmask

OBJECTIVES = ("mrm", "mim", "mlm", "itc", "itm")


@dataclass
class MamoConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection
    temperature: float = 0.07  # learnable, clamped to [0.001, 0.5] as in ALBEF
    image_mask_ratio: float = 0.75
    text_mask_ratio: float = 0.25
    ema_decay: float = 0.995
    objectives: Tuple[str, ...] = OBJECTIVES
    smoothing: float = 0.0  # ITM negatives ∝ softmax + smoothing (ALBEF 0)
    target_dropout: bool = False  # the target network's dropout during training (ALBEF's momentum models: on)
    # ITC as ALBEF's and BLIP's (vlfast.ops.momentum_itc_loss): keys from the target network (with
    # projections of its own) and a queue of itc_queue earlier ones (ALBEF 65536, BLIP 57600), targets
    # with itc_alpha of the momentum softmax (ALBEF 0.4), ramped up linearly over the first
    # itc_alpha_warmup steps (ALBEF: one epoch). Both 0: in-batch ITC on the online features.
    itc_queue: int = 0
    itc_alpha: float = 0.0
    itc_alpha_warmup: int = 0

    @property
    def momentum_itc(self) -> bool:
        return self.itc_queue > 0 or self.itc_alpha > 0


def _mlp(width_in: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, width_in), nn.GELU(), nn.Linear(width_in, width_out))


class Mamo(nn.Module):
    def __init__(self, config: MamoConfig, *, mask_token_id: int, special_ids: Sequence[int]):
        super().__init__()
        unknown = set(config.objectives) - set(OBJECTIVES)
        if unknown or not config.objectives:
            raise ValueError(f"objectives must be a non-empty subset of {OBJECTIVES}, got {config.objectives}")
        width = config.vision.width
        if config.text.width != width or config.text.encoder_width != width:
            raise ValueError(f"the fusion layers serve both streams: text width ({config.text.width}) and "
                             f"encoder_width ({config.text.encoder_width}) must equal the image width ({width})")
        self.config, self.mask_token_id, self.special_ids = config, mask_token_id, tuple(special_ids)
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = BertForMaskedLM(config.text)
        self.vision_proj = nn.Linear(width, config.embed_dim)
        self.text_proj = nn.Linear(width, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(config.temperature))
        self.itm_head = nn.Linear(width, 2)
        self.image_mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.mrm_projector = _mlp(width, width)  # g: online fused features -> target fused features
        self.mim_predictor = _mlp(width, width)  # online fused image features -> target image-encoder features
        for head in (self.vision_proj, self.text_proj, self.itm_head, self.mrm_projector, self.mim_predictor):
            head.apply(init_weights)
        nn.init.normal_(self.image_mask_token, std=0.02)
        if not (config.itc_queue >= 0 and 0 <= config.itc_alpha <= 1 and config.itc_alpha_warmup >= 0):
            raise ValueError(f"need itc_queue >= 0, 0 <= itc_alpha <= 1 and itc_alpha_warmup >= 0, got "
                             f"{config.itc_queue}, {config.itc_alpha} and {config.itc_alpha_warmup}")
        self.target = MomentumModel(self._encoders(), config.ema_decay)
        if config.momentum_itc:  # ids too: retrieval fine-tuning's positives are every entry of the same image
            self.itc_queue = FeatureQueue(config.itc_queue, config.embed_dim, ids=True)
            self.register_buffer("itc_ramp_start", torch.zeros((), dtype=torch.int64))  # restart_itc_ramp
        self._register_load_state_dict_pre_hook(self._across_the_itc_switch)

    def _encoders(self) -> nn.ModuleDict:
        """The online modules the target network averages: the encoders, and with momentum ITC the
        ITC projections (ALBEF's vision_proj_m, text_proj_m); not the heads."""
        modules = {"visual_encoder": self.visual_encoder, "bert": self.text_encoder.bert}
        if self.config.momentum_itc:
            modules.update(vision_proj=self.vision_proj, text_proj=self.text_proj)
        return nn.ModuleDict(modules)

    def itc_alpha(self):
        """The distillation weight at this step: itc_alpha · min(1, updates / itc_alpha_warmup),
        the updates of the target counted since restart_itc_ramp, on the device (no host read; a
        CUDA graph's replays advance it)."""
        if not (self.config.itc_alpha and self.config.itc_alpha_warmup):
            return self.config.itc_alpha
        updates = (self.target.step - self.itc_ramp_start).float()
        return self.config.itc_alpha * (updates / self.config.itc_alpha_warmup).clamp(0.0, 1.0)

    @torch.no_grad()
    def restart_itc_ramp(self) -> None:
        """Ramp alpha up again from 0 (a new run from trained weights: ALBEF's retrieval
        fine-tuning ramps it over its first epoch as pretraining did)."""
        if self.config.momentum_itc:
            self.itc_ramp_start.copy_(self.target.step)

    def _across_the_itc_switch(self, state_dict, prefix, *args) -> None:
        """Weights saved with momentum ITC off load with it on (the target's projections start as
        the loaded online ones, the queue as ALBEF's, the ramp at 0), and the other way round (the
        queue and the target's projections are left out); a warning says which."""
        momentum_keys = [key for key in state_dict if key.startswith((prefix + "itc_", prefix + "target.model.vision_proj.",
                                                                      prefix + "target.model.text_proj."))]
        if not self.config.momentum_itc and momentum_keys:
            for key in momentum_keys:
                del state_dict[key]
            warnings.warn("momentum ITC is off: the loaded queue and the target's ITC projections are left out")
        elif self.config.momentum_itc and not momentum_keys:
            for name in ("vision_proj", "text_proj"):
                for tensor in ("weight", "bias"):
                    state_dict[f"{prefix}target.model.{name}.{tensor}"] = state_dict[f"{prefix}{name}.{tensor}"]
            for key, value in self.itc_queue.state_dict(prefix=prefix + "itc_queue.").items():
                state_dict[key] = value
            state_dict[prefix + "itc_ramp_start"] = self.itc_ramp_start
            warnings.warn("these weights had no momentum ITC: the target's ITC projections start as the online "
                          "ones and the queue as ALBEF's")

    @torch.no_grad()
    def reset_target(self) -> None:
        """Target = the online encoders, e.g. after loading pretrained weights into them."""
        self.target.model.load_state_dict(self._encoders().state_dict())

    @torch.no_grad()
    def update_target(self) -> None:
        """After each optimizer step: target <- EMA of the online encoders (vlfast.ops.ema_update_)."""
        self.target.update(self._encoders())

    @staticmethod
    def fuse_text(bert: BertModel, text: Tensor, text_mask: Tensor, image: Union[Tensor, ContextCache],
                  image_index: Optional[Tensor] = None, cls_only: bool = False) -> Tensor:
        """Fused text (B, Lt, W): the text stream cross-attends to the image tokens, or to entries
        ``image_index`` (B,) of a cache of their keys and values (fusion_cache). ``cls_only``: the
        fused [CLS] alone, (B, 1, W), the last layer computed there only."""
        return bert(attention_mask=text_mask, mode="fusion", states=text, context=image, context_index=image_index,
                    cls_only=cls_only)

    def fusion_cache(self, image: Tensor) -> ContextCache:
        """The text stream's cross-attention keys and values of image tokens (I, 1 + N, W), every
        fusion layer's, computed once: fuse_text and itm_logits then read them per pair by index
        (retrieval's re-ranking: an image's projections once, not once per text)."""
        return self.text_encoder.bert.context_cache(image)

    @staticmethod
    def fuse_image(bert: BertModel, image: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """Fused image (B, 1 + N, W): the image stream, through the same layers, cross-attends to the text.
        ``image`` already carries its position embedding (see the module's docstring). Each objective runs
        only the stream its loss reads: the other would cost a stack of layers for nothing."""
        return bert(mode="fusion", states=image, context=text, context_mask=text_mask)

    def fuse_masked_image(self, visible: Tensor, ids_restore: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """f(I', T) at every image position (B, 1 + N, W): the encoder's output on the visible patches
        (B, 1 + L, W), [CLS] first, with mask tokens put back where ``ids_restore`` ≥ L and the image
        encoder's position embedding added to every token (one unmask pass), through the image stream."""
        pos_embed = self.visual_encoder.pos_embed  # (1, 1 + N, W)
        patches = unmask(visible[:, 1:], ids_restore, self.image_mask_token, pos_embed=pos_embed[:, 1:])
        image = torch.cat([visible[:, :1] + pos_embed[:, :1], patches], dim=1)
        return self.fuse_image(self.text_encoder.bert, image, text, text_mask)

    def embed_image(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """(image tokens (B, 1 + N, W), the L2-normalised ITC feature (B, embed_dim))."""
        image = self.visual_encoder.forward_features(images)
        return image, F.normalize(self.vision_proj(image[:, 0]), dim=-1)

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor]:
        """(text states (B, Lt, W), the L2-normalised ITC feature (B, embed_dim))."""
        text = self.text_encoder.bert(input_ids, attention_mask, mode="text")
        return text, F.normalize(self.text_proj(text[:, 0]), dim=-1)

    def itm_logits(self, image: Union[Tensor, ContextCache], text: Tensor, attention_mask: Tensor,
                   image_index: Optional[Tensor] = None) -> Tensor:
        """(B, 2) ITM logits of the pairs (image tokens[b], text states[b]), or with ``image_index``
        (B,) of (cache entry image_index[b], text states[b]) for a fusion_cache; column 1 is "match"."""
        fused = self.fuse_text(self.text_encoder.bert, text, attention_mask, image, image_index, cls_only=True)
        return self.itm_head(fused[:, 0])

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                generator: Optional[torch.Generator] = None, image_ids: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """The loss of each configured objective and their equal-weight sum, "loss". With
        ``image_ids`` (B,), pairs that share an image are all ITC positives and never ITM negatives."""
        objectives = set(self.config.objectives)
        bert = self.text_encoder.bert
        batch = images.shape[0]
        losses = {}
        image, image_feat = self.embed_image(images)  # (B, 1 + N, W)
        masked_text = bool(objectives & {"mlm", "mrm"})  # f(I, T'): BERT's 80/10/10 masking of the caption
        if masked_text:
            masked_ids, labels = mask_tokens(input_ids, vocab_size=self.config.text.vocab_size,
                                             mask_token_id=self.mask_token_id, special_ids=self.special_ids,
                                             probability=self.config.text_mask_ratio, generator=generator)
            # T and T' through the text encoder as one batch of 2B: the same weights, half the launches
            both = bert(torch.cat([input_ids, masked_ids]), attention_mask.repeat(2, 1), mode="text")
            text, masked_text_states = both[:batch], both[batch:]
        else:
            text = bert(input_ids, attention_mask, mode="text")
        text_feat = F.normalize(self.text_proj(text[:, 0]), dim=-1)  # text (B, Lt, W), text_feat (B, embed_dim)

        momentum_itc = self.config.momentum_itc and bool(objectives & {"itc", "itm"})
        if objectives & {"mrm", "mim"} or momentum_itc:  # the EMA network on the unmasked pair
            with torch.no_grad():
                target = self.target.compute_model  # bf16 weights where train.py asks for them
                target.train(self.training and self.config.target_dropout)
                target_image = target["visual_encoder"].forward_features(images)
                target_text = target["bert"](input_ids, attention_mask, mode="text")
        if objectives & {"mrm", "mim"}:  # their targets: the EMA network's fused streams
            with torch.no_grad():
                target_fused_text = self.fuse_text(target["bert"], target_text, attention_mask, target_image)
                target_fused_image = self.fuse_image(target["bert"], target_image + target["visual_encoder"].pos_embed,
                                                     target_text, attention_mask)

        # The text stream's fusion pairs: ITM's B positives and 2B negatives, then (I, T'); one pass,
        # which reads the B images' cross-attention keys and values, computed once, by index.
        fusion_image_index, fusion_texts, fusion_masks = [], [], []
        same = torch.arange(batch, device=images.device)  # pair b reads image b
        if objectives & {"itc", "itm"}:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            # Under torch.distributed in-batch ITC's keys come from every rank (gradients flow back to
            # each); the ITM negatives stay local, as in ALBEF, from a draw over this rank's batch.
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            if momentum_itc:
                contrastive = self._momentum_itc(image_feat, text_feat, target, target_image, target_text, image_ids,
                                                 "itm" in objectives, generator)
                distributed = False  # its keys are this rank's batch and the queue every rank shares, as ALBEF's
            else:
                contrastive = itc_loss(image_feat, text_feat, self.temp, image_ids=image_ids, all_gather=distributed,
                                       sample_negatives="itm" in objectives and not distributed,
                                       smoothing=self.config.smoothing, generator=generator)
            if "itc" in objectives:
                losses["itc"] = contrastive.loss
            if "itm" in objectives:
                if distributed:
                    contrastive = itc_loss(image_feat.detach(), text_feat.detach(), self.temp.detach(),
                                           image_ids=image_ids, smoothing=self.config.smoothing, generator=generator)
                neg_image, neg_text = contrastive.neg_image_idx, contrastive.neg_text_idx
                fusion_image_index += [same, neg_image, same]
                fusion_texts += [text, text, text[neg_text]]
                fusion_masks += [attention_mask, attention_mask, attention_mask[neg_text]]
        if masked_text:
            fusion_image_index.append(same)
            fusion_texts.append(masked_text_states)
            fusion_masks.append(attention_mask)
        if fusion_texts:
            one = lambda tensors: tensors[0] if len(tensors) == 1 else torch.cat(tensors)  # noqa: E731 (no copy of one)
            fused = self.fuse_text(bert, one(fusion_texts), one(fusion_masks), self.fusion_cache(image),
                                   one(fusion_image_index))
        if "itm" in objectives:  # 2-way matching on the fused [CLS]; column 1 is "match"
            labels_itm = (torch.arange(3 * batch, device=image.device) < batch).long()  # made on the GPU: no copy
            losses["itm"] = F.cross_entropy(self.itm_head(fused[:3 * batch, 0]), labels_itm)

        if objectives & {"mrm", "mim"}:  # f(I', T): the image encoder sees only the visible patches
            visible, masking = self.visual_encoder.forward_masked(images, self.config.image_mask_ratio, generator)
            fused_image = self.fuse_masked_image(visible, masking.ids_restore, text, attention_mask)
            masked = _masked_positions(masking)
            predicted = _patches_at(fused_image, masked)
            if "mim" in objectives:
                losses["mim"] = F.l1_loss(self.mim_predictor(predicted), _patches_at(target_image, masked))
            if "mrm" in objectives:
                losses["mrm_image"] = F.mse_loss(self.mrm_projector(predicted), _patches_at(target_fused_image, masked))

        if masked_text:
            fused_text = fused[-batch:]  # f(I, T')
            # Every token goes through the heads and the unchosen ones weigh 0 (ALBEF's MLM does the
            # same): selecting the chosen ones, a random number, would wait for the GPU to count them.
            if "mlm" in objectives:
                logits = self.text_encoder.cls.predictions(fused_text)
                losses["mlm"] = F.cross_entropy(logits.flatten(0, 1), labels.flatten())  # -100: ignored
            if "mrm" in objectives:
                chosen = (labels != -100).float()
                error = (self.mrm_projector(fused_text).float() - target_fused_text.float()).pow(2).mean(-1)
                losses["mrm_text"] = (error * chosen).sum() / chosen.sum()

        if "mrm" in objectives:
            losses["mrm"] = (losses.pop("mrm_image") + losses.pop("mrm_text")) / 2
        losses["loss"] = sum(losses.values())
        return losses

    def _momentum_itc(self, image_feat, text_feat, target, target_image, target_text, image_ids, sample_negatives,
                      generator):
        """ALBEF's ITC: the online features against the target network's and the queue; then the
        batch's target features join the queue (in training)."""
        with torch.no_grad():
            image_feat_m = F.normalize(target["vision_proj"](target_image[:, 0]), dim=-1)
            text_feat_m = F.normalize(target["text_proj"](target_text[:, 0]), dim=-1)
        image_queue, text_queue, id_queue = self.itc_queue.keys()
        contrastive = momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.temp,
                                        alpha=self.itc_alpha(), image_queue=image_queue, text_queue=text_queue,
                                        image_ids=image_ids, id_queue=id_queue if image_ids is not None else None,
                                        sample_negatives=sample_negatives, smoothing=self.config.smoothing,
                                        generator=generator)
        if self.training:
            self.itc_queue.enqueue(image_feat_m, text_feat_m, image_ids)
        return contrastive


def _masked_positions(masking) -> Tensor:
    """(B, M) int64: each image's masked patch indices, ascending (the order of boolean indexing
    with ``masking.mask``). Every image has the same M, so no host sync counts them."""
    masked_per_image = masking.mask.shape[1] - masking.ids_keep.shape[1]
    return torch.sort(masking.mask, dim=1, descending=True, stable=True).indices[:, :masked_per_image]


def _patches_at(tokens: Tensor, positions: Tensor) -> Tensor:
    """tokens (B, 1 + N, W) [CLS] first, positions (B, M) -> (B·M, W) patch rows."""
    patches = tokens[:, 1:]
    return torch.gather(patches, 1, positions[..., None].expand(-1, -1, patches.shape[-1])).flatten(0, 1)
