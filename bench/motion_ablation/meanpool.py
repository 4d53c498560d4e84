"""Mean of the projected caption tokens added to the attention-pooled caption vector."""

import model.unet as U


def apply() -> None:
    orig = U.SpaceTimeUNet.encode_text

    def encode_text(self, text_emb, text_mask, batch):
        pooled, context, mask = orig(self, text_emb, text_mask, batch)
        m = mask.to(context.dtype)[..., None]
        return pooled + (context * m).sum(1) / m.sum(1).clamp(min=1), context, mask

    U.SpaceTimeUNet.encode_text = encode_text
