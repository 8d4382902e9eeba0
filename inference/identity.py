"""Who made a result: the model bundle's identity and its diagnosis outcomes.

A leaf module (standard library only, no torch) so that :mod:`inference.results` and every result
it describes can be imported in a notebook without loading the networks. :mod:`inference.bundle`
re-exports these types, so ``from inference.bundle import BundleIdentity, Outcome`` keeps working.
:class:`BundleError` lives here for the same reason: a command can catch it without importing torch,
so that ``psg-gateway infer`` loads torch beside the read instead of before it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field


class BundleError(ValueError):
    """A model bundle folder that is incomplete or inconsistent."""


@dataclass(frozen=True)
class Outcome:
    """One output of the diagnosis head.

    Parameters
    ----------
    index : int
        Column of the head's output (``label_idx`` in ``label_mapping.csv``).
    phecode : str
        The outcome's phecode, e.g. ``"327.3"`` (sleep apnea); for a site Cox head's outcome, its label.
    name : str
        Its phenotype name, as the label mapping spells it (a site head's outcome: its label again).
    head : str, optional
        ``""`` for the bundle's diagnosis head; a site head's ``name@checksum`` otherwise.
    """

    index: int
    phecode: str
    name: str
    head: str = ""  # "" for the bundle's diagnosis head; a site head's ``name@checksum`` otherwise


@dataclass(frozen=True)
class BundleIdentity:
    """What every result records about the model that produced it.

    Parameters
    ----------
    name, version : str
        The bundle's name and version (from ``bundle.json``; the folder name and ``"unknown"``
        when it does not say).
    validated : bool
        Whether the site has stated that it validated the bundle. Never true for demo weights.
    path : str
        The bundle folder, resolved.
    checkpoints : dict of str to str, optional
        Component (``base``, ``staging``, ``diagnosis``) to the SHA-256 of its checkpoint file.
    site_heads : dict of str to str, optional
        The site's own heads in use: name to SHA-256.
    calibrated_outcomes : tuple of str, optional
        Phecodes of the diagnosis outcomes whose log-hazard the bundle declares calibrated to a
        baseline (``bundle.json`` ``calibrated_outcomes``). A Cox head's log-hazard is otherwise
        defined only up to a constant per outcome, so absolute thresholds and hazard ratios mean
        something only for these.
    """

    name: str
    version: str
    validated: bool
    path: str
    checkpoints: dict[str, str] = field(default_factory=dict)  # component -> SHA-256
    site_heads: dict[str, str] = field(default_factory=dict)  # a site's own heads in use: name -> SHA-256
    calibrated_outcomes: tuple[str, ...] = ()  # phecodes with a declared baseline (bundle.json)

    def as_dict(self) -> dict:
        """Return the identity as a plain, JSON-ready ``dict`` (``dataclasses.asdict``).

        Returns
        -------
        dict
            ``name``, ``version``, ``validated``, ``path``, ``checkpoints``, ``site_heads``,
            ``calibrated_outcomes``.
        """
        return asdict(self)

    @property
    def model_hash(self) -> str | None:
        """One hash over the checkpoints' hashes: the model identity a result was made with (a site
        head's outcomes are named by their own checksum, so deploying one does not change it).

        Returns
        -------
        str or None
            SHA-256 hex digest of ``"component=sha;"`` pairs in sorted order, or ``None`` when no
            checkpoint is recorded.
        """
        if not self.checkpoints:
            return None
        joined = "".join(f"{k}={v};" for k, v in sorted(self.checkpoints.items()))
        return hashlib.sha256(joined.encode()).hexdigest()
