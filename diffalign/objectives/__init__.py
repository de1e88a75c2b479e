"""Objectives: what turns a method's loss into training batches. The trainer picks one by the method's kind.

An objective is built from a :class:`~diffalign.objectives.context.TrainContext`; it has ``batches()``
(an endless iterator of batches) and ``__call__(batch)`` returning a
:class:`~diffalign.methods.base.LossOutput`, and may define ``state_dict``/``load_state_dict`` (saved
in checkpoints), ``on_step_end(step)`` and ``evaluate()`` (the method's objective on fixed training
data, before and after training).

``pairs``    :class:`~diffalign.objectives.pairs.PairObjective` (DPO, MaPO)
``online``   :class:`~diffalign.objectives.online.OnlineObjective` (PRDP, DDPO, GRPO)
``winners``  :class:`~diffalign.objectives.winners.SePPOObjective` (SePPO)
``reward_gradient`` :class:`~diffalign.objectives.reward_gradient.RewardGradientObjective` (DRaFT, DRaFT-K,
             DRaFT-LV, AlignProp, ReFL)
``nft``      :class:`~diffalign.objectives.nft.NFTObjective` (DiffusionNFT)
"""

from diffalign.objectives.context import TrainContext, unwrap
from diffalign.objectives.nft import NFTObjective
from diffalign.objectives.online import OnlineObjective
from diffalign.objectives.pairs import PairObjective
from diffalign.objectives.reward_gradient import RewardGradientObjective
from diffalign.objectives.winners import SePPOObjective

#: The objective class of each method kind (``MethodSpec.kind``).
OBJECTIVES = {"pairs": PairObjective, "online": OnlineObjective, "winners": SePPOObjective,
              "reward_gradient": RewardGradientObjective, "nft": NFTObjective}

__all__ = ["OBJECTIVES", "NFTObjective", "OnlineObjective", "PairObjective", "RewardGradientObjective",
           "SePPOObjective", "TrainContext", "unwrap"]
