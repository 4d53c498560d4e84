"""Pieces more than one patch needs."""

import model.unet as U


def pass_cond_to_temporal_conv() -> None:
    """Make each stage hand its conditioning to the temporal conv (the package's conv takes none), for
    the patches whose temporal conv depends on the caption (cgate, dyn)."""

    def _stage(self, stage, h, cond, frames, context, context_mask, frame_mask, num_video_frames):
        h = self._run(stage.res, h, cond)
        if stage.tconv is not None:
            h = self._run(stage.tconv, h, frames, num_video_frames, cond)
        if stage.attn is not None:
            h = self._run(stage.attn, h, frames, context, context_mask, frame_mask)
        return h

    U.SpaceTimeUNet._stage = _stage
