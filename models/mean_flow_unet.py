"""A ``UNet2DModel`` with a second time input, the interval h = t − r, for MeanFlow's average velocity u(z, r, t).

MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", §4 and Table 1c) conditions the network
on two times; of the pairs it compares, (t, t − r) is the best. This model keeps ``UNet2DModel`` whole (its
config, weights, attention processors and class labels) and adds an embedding of h, built like the time's
(the same sinusoid, its own MLP), to the time embedding before the blocks read it:

    emb = time_embedding(sinusoid(t)) + interval_embedding(sinusoid(h)) [+ class_embedding(c)].

The interval's last layer starts at zero, so a fresh model is the plain UNet, and ``interval`` defaults to 0:
u(z, t, t) is the instantaneous velocity v(z, t), so every flow sampler drives the model unchanged, and the
``mean-flow`` sampler (``schedulers.mean_flow``) passes the interval to the next level to jump there.
"""

from __future__ import annotations

import functools

import torch
from diffusers import ModelMixin, UNet2DModel  # noqa: F401 (from_pretrained looks ModelMixin up here)
from diffusers.models.embeddings import TimestepEmbedding


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


class MeanFlowUNet2DModel(UNet2DModel):
    """``UNet2DModel`` plus ``interval`` in ``forward``: the network u_θ(z, r, t) of MeanFlow, fed (t, t − r).

    Same constructor and config as ``UNet2DModel`` (``from_config`` / ``from_pretrained`` read it unchanged);
    ``interval`` is on the timestep's scale (a flow model's ``(t − r) · num_train_timesteps``), one value or one
    per image.
    """

    @functools.wraps(UNet2DModel.__init__)  # the same signature: ConfigMixin reads the config keys from it
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        width, embedding_width = self.time_embedding.linear_1.in_features, self.time_embedding.linear_2.out_features
        self.interval_embedding = TimestepEmbedding(width, embedding_width)
        torch.nn.init.zeros_(self.interval_embedding.linear_2.weight)
        torch.nn.init.zeros_(self.interval_embedding.linear_2.bias)
        self._interval = None
        self.time_embedding.register_forward_hook(self._add_interval)
        # torch's forward-mode rule for group_norm views its input, which fails on the channels-last view an
        # attention block returns: MeanFlow's JVP (torch.func.jvp) needs the norms' inputs contiguous.
        for module in self.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.register_forward_pre_hook(_contiguous_input)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                interval=None, return_dict: bool = True):
        self._interval = torch.zeros((), device=sample.device) if interval is None else interval
        try:
            return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)
        finally:
            self._interval = None

    def _add_interval(self, module, inputs, time_embedding: torch.Tensor) -> torch.Tensor:
        """The time embedding's forward hook: add the interval's embedding, broadcast over the batch."""
        interval = torch.as_tensor(self._interval, device=time_embedding.device)
        interval = interval.reshape(-1) * torch.ones(len(time_embedding), dtype=interval.dtype,
                                                     device=interval.device)
        embedded = self.time_proj(interval).to(time_embedding.dtype)
        return time_embedding + self.interval_embedding(embedded)
