"""diagnostic (not a fix): hand the model the product caption-sign x frame position: cond_t = cond + s * P(t),

s = +1 for "right", -1 for "left" read from the one-hot direction token (needs the onehot patch and
model.frame_position_embedding=true)
"""

import torch

import model.unet as U


def apply() -> None:
    _enc = U.SpaceTimeUNet.encode_text

    def encode_text(self, text_emb, text_mask, batch):
        if text_emb is not None and text_emb.shape[1] == 3:
            d = text_emb[:, 2, 20:24]  # left, right, up, down one-hot (x5)
            present = text_mask[:, 2].to(d.dtype) if text_mask is not None else 1.0
            self._sign = ((d[:, 1] - d[:, 0]) / 5.0 * present).to(text_emb.dtype)
        else:
            self._sign = None
        return _enc(self, text_emb, text_mask, batch)

    def per_frame_cond(self, cond, frames, num_video_frames, extra=None):
        nv = frames if num_video_frames is None else num_video_frames
        if nv < 2:
            return cond.repeat_interleave(frames, dim=0)
        pos = self.frame_embed(nv, device=cond.device).to(cond.dtype)
        pos = torch.cat([pos, pos.new_zeros(frames - nv, pos.shape[1])]) if nv < frames else pos
        s = (
            self._sign
            if getattr(self, "_sign", None) is not None
            else torch.zeros(cond.shape[0], device=cond.device)
        )
        return (cond[:, None, :] + s[:, None, None] * pos[None]).flatten(0, 1)

    U.SpaceTimeUNet.encode_text = encode_text
    U.SpaceTimeUNet.per_frame_cond = per_frame_cond
