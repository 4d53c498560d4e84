"""temporal layers start random instead of zero: tconv conv default init; temporal attention's to_out default init"""

import os

import model.attention as A
import model.blocks as B


def apply() -> None:
    _tc_init = B.TemporalConv.__init__

    def _tc(self, ch, groups, kernel=3):
        _tc_init(self, ch, groups, kernel)
        self.conv.reset_parameters()

    B.TemporalConv.__init__ = _tc
    if os.environ.get("RINIT_ATTN"):
        _at_init = A.SpaceTimeAttention.__init__

        def _at(self, *a, **k):
            _at_init(self, *a, **k)
            self.attn_time.to_out.reset_parameters()

        A.SpaceTimeAttention.__init__ = _at
