"""A vision-language model on megatron-core: a family's vision tower + the megatron language model.

Design decisions:
- The vision tower is the family's own transformers module, replicated across TP (and CP) ranks and
  living on the first pipeline stage. It is small next to the language model (~0.4B of
  Qwen3-VL-30B-A3B's 31B), runs once per image rather than once per token, and reusing it makes the
  vision half exactly transformers' (weights, position-embedding interpolation, window attention),
  so conversion parity there is by construction and new families cost nothing. Its parameters are
  plain replicated params: megatron's DDP reduces their gradients over DP x CP like any dense param
  (each CP rank back-propagates only its own sequence chunks into it). It is built where megatron
  builds the language model, on this rank's device (the current CUDA device on GPU) in the config's
  `params_dtype`, buffers included (transformers keeps its rotary `inv_freq` in fp32), as is the
  M-RoPE table: nothing of the model is left on the host for a later move to forget.
- Image features are scattered into the text embeddings on the full sequence, in transformers'
  batch-major order; then the sequence is cut for context parallelism (megatron's load-balanced
  chunks) and scattered for sequence parallelism. Every CP rank therefore receives the full-length
  token ids and images; position ids are the full sequence's 3-D M-RoPE ids (models/mrope.py), cut
  to this rank's chunks inside the rotary embedding. So image positions, M-RoPE ids and tokens are
  split consistently by construction.
- DeepStack (Qwen3-VL): features from intermediate vision layers are added to the outputs of the
  first language layers at the image positions, through forward hooks on those layers, with the
  same CP / SP cut as the hidden states. Those layers must sit on the first pipeline stage (true for
  real configs: Qwen3-VL uses 3 deepstack layers); a layout that puts one on a later stage is
  refused at build time.
- `return_hidden=True` makes the last stage return its final hidden states and the LM-head weight
  instead of logits: megatron's output layer is bypassed for that call and records the weight it
  was given (the embedding's under tied embeddings, else its own), so the trainer forms log-probs
  and the policy loss from hidden states (kernels.logprobs / kernels.policy_loss) without [T, V]
  logits. Under sequence parallelism the hidden states stay this rank's sequence slice, which is
  what those kernels take.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megatron_vlm.models.language import LanguageModelConfig, build_language_model
from megatron_vlm.models.mrope import MRotaryEmbedding
from megatron_vlm.models.attention import packed_seq_params_padded
from megatron_vlm.parallel.batching import split_for_cp, thd_cp_index


@dataclass
class VisionSpec:
    """What a family contributes besides its language config (see models/<family>/provider.py)."""
    build_vision: Callable[[torch.device, torch.dtype], torch.nn.Module]  # (device, params dtype) -> tower
    # (vision, pixel_values, image_grid_thw) -> (features [n_image_tokens, H], deepstack list)
    image_features: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]
    image_token_id: int
    spatial_merge_size: int
    mrope_section: list[int]
    mrope_interleaved: bool
    num_deepstack: int = 0


class VisionLanguageModel(MegatronModule):
    def __init__(self, lm: LanguageModelConfig, vision: VisionSpec, config, device_type: str,
                 pre_process: bool | None = None, post_process: bool | None = None):
        super().__init__(config=config)
        self.lm, self.spec = lm, vision
        self.language = build_language_model(
            lm, config, device_type, pre_process, post_process, position_embedding_type="mrope",
            scatter_embedding_sequence_parallel=False)
        self.pre_process, self.post_process = self.language.pre_process, self.language.post_process
        self.model_type = self.language.model_type  # read by megatron's schedules
        self.share_embeddings_and_output_weights = self.language.share_embeddings_and_output_weights
        device = build_device(device_type)
        with torch.device(device):
            self.language.rotary_pos_emb = MRotaryEmbedding(
                lm.head_dim, lm.rotary_base, vision.mrope_section, vision.mrope_interleaved,
                cp_group=parallel_state.get_context_parallel_group())
        self.vision = vision.build_vision(device, config.params_dtype) if self.pre_process else None
        self._deepstack: list[torch.Tensor] | None = None
        self._hook_deepstack_layers()

    # -- megatron model interface ------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.language.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language.shared_embedding_or_output_weight()

    def _hook_deepstack_layers(self) -> None:
        if not self.spec.num_deepstack:
            return
        per_stage = self.lm.num_layers // self.config.pipeline_model_parallel_size
        if self.spec.num_deepstack > per_stage:
            raise ValueError(f"{self.spec.num_deepstack} deepstack layers do not fit on the first "
                             f"pipeline stage ({per_stage} layers with PP="
                             f"{self.config.pipeline_model_parallel_size})")
        if not self.pre_process:
            return
        for layer in self.language.decoder.layers:
            index = layer.layer_number - 1  # global
            if index < self.spec.num_deepstack:
                layer.register_forward_hook(self._make_deepstack_hook(index))

    def _make_deepstack_hook(self, index: int):
        def hook(module, args, output):
            if self._deepstack is None:
                return output
            hidden, context = output
            return hidden + self._deepstack[index], context
        return hook

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, packed_seq_params=None,
                mm_token_type_ids: torch.Tensor | None = None, return_hidden: bool = False):
        """input_ids / labels [b, s] and position_ids [3, b, s] for the FULL sequence on every CP
        rank. Returns per-token losses [b, s_local] with labels, else logits [b, s_local, V/tp];
        with return_hidden (last stage) the pair (hidden [b, s_local(/tp under SP), H], head
        weight [V/tp, H]). Stages before the last return the tensor they pass on, as always.

        Image features go where `mm_token_type_ids == 1` when given (so an image-placeholder id that
        a policy happened to generate in its response stays a text token, as in transformers'
        generation), else where input_ids equal the image token id."""
        cut = self._cp_cut(packed_seq_params)
        decoder_input = None
        if self.pre_process:
            image_mask = (mm_token_type_ids == 1 if mm_token_type_ids is not None
                          else input_ids == self.spec.image_token_id)
            decoder_input = self._embed(input_ids, image_mask, pixel_values, image_grid_thw, cut)
        if labels is not None:
            labels = cut(labels, 1)
        run = lambda: self.language(cut(input_ids, 1), position_ids,  # noqa: E731
                                    None, decoder_input=decoder_input, labels=labels,
                                    packed_seq_params=packed_seq_params)
        try:
            with self.language.rotary_pos_emb.packed_call(packed_seq_params is not None):
                if not (return_hidden and self.post_process):
                    return run()
                with self._output_layer_passthrough() as head:
                    hidden = run()  # [b, s_local, H]: megatron's [s b h] -> [b s h] transpose of "logits"
                return hidden, head["weight"]
        finally:
            self._deepstack = None

    @staticmethod
    def _cp_cut(packed_seq_params):
        """(tensor, seq_dim) -> this CP rank's tokens: megatron's load-balanced chunks of the whole
        sequence, or of each sample of a packed THD sequence (at its padded boundaries)."""
        cp = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
        if cp == 1:
            return lambda tensor, seq_dim: tensor
        if packed_seq_params is None:
            return lambda tensor, seq_dim: split_for_cp(tensor, cp, cp_rank, seq_dim=seq_dim)
        index = thd_cp_index(packed_seq_params_padded(packed_seq_params), cp, cp_rank)
        return lambda tensor, seq_dim: tensor.index_select(seq_dim, index.to(tensor.device))

    @contextmanager
    def _output_layer_passthrough(self):
        """The output layer returns its input and records the weight it was called with."""
        layer, head = self.language.output_layer, {}

        def passthrough(hidden, weight=None, runtime_gather_output=None):
            head["weight"] = layer.weight if weight is None else weight
            return hidden, None

        layer.forward = passthrough  # an instance attribute shadows the class's forward
        try:
            yield head
        finally:
            del layer.forward

    def _embed(self, input_ids, image_mask, pixel_values, image_grid_thw, cut) -> torch.Tensor:
        embeds = self.language.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if pixel_values is not None:
            features, deepstack = self.spec.image_features(self.vision, pixel_values, image_grid_thw)
            found = int(image_mask.sum())
            if found != features.shape[0]:
                raise ValueError(f"{found} image tokens in input_ids but the images give "
                                 f"{features.shape[0]} features (image_grid_thw "
                                 f"{image_grid_thw.tolist()})")
            embeds = _scatter_batch_major(embeds, image_mask, features)
            self._deepstack = [self._local(_scatter_batch_major(torch.zeros_like(embeds), image_mask, f), cut)
                               for f in deepstack[: self.spec.num_deepstack]]
        return self._local(embeds, cut)

    def _local(self, full: torch.Tensor, cut) -> torch.Tensor:
        """[s, b, h] full sequence -> this rank's CP chunks, then its sequence-parallel slice."""
        local = cut(full, 0)
        if self.config.sequence_parallel:
            local = tensor_parallel.scatter_to_sequence_parallel_region(local)
        return local


def build_device(device_type: str) -> torch.device:
    """Where this rank builds the modules megatron does not (vision tower, M-RoPE): the current CUDA
    device, as megatron does for its own parameters, or the host."""
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)


def _scatter_batch_major(embeds: torch.Tensor, mask: torch.Tensor, values: torch.Tensor):
    """Put `values` (in [b, s] row-major order of `mask`) into embeds [s, b, h]; differentiable."""
    batch_major = embeds.transpose(0, 1)
    batch_major = batch_major.masked_scatter(mask[..., None], values.to(embeds.dtype))
    return batch_major.transpose(0, 1).contiguous()
