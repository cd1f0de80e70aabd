"""The three creators of the original's ``creator_tool.py``, one file each, re-exported under its name.

* :class:`ProposalCreator` (``proposal_creator.py``): the RPN's proposal layer, offsets + scores -> RoIs.
* :class:`AnchorTargetCreator` (``anchor_target_creator.py``): RPN training targets per anchor.
* :class:`ProposalTargetCreator` (``proposal_target_creator.py``): RoI-head training samples and targets.

Their shared steps (matching, balanced sampling, the box coder) live in ``target_helpers.py``.
"""

from model.utils.anchor_target_creator import AnchorTargetCreator
from model.utils.proposal_creator import ProposalCreator
from model.utils.proposal_target_creator import ProposalTargetCreator

__all__ = ["AnchorTargetCreator", "ProposalCreator", "ProposalTargetCreator"]
