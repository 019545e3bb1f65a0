"""B4B LightningModules (re-exported under their earlier import path).

* ``rsgm.lightning_modules.b4b_victim``: ``VictimEncoderModule``, ``B4BEncoder``;
* ``rsgm.lightning_modules.b4b_protocol``: ``B4BProtocol`` (Table 6.4.1, results only;
  ``rsgm.callbacks.b4b_report.B4BReportCallback`` writes the tables and figures);
* ``rsgm.lightning_modules.b4b_stealing``: ``StealingModule`` (in-process or over HTTP).
"""
from rsgm.lightning_modules.b4b_protocol import B4BProtocol
from rsgm.lightning_modules.b4b_stealing import StealingModule
from rsgm.lightning_modules.b4b_victim import B4BEncoder, VictimEncoderModule

__all__ = ["B4BEncoder", "B4BProtocol", "StealingModule", "VictimEncoderModule"]
