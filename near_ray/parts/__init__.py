"""Part tables and the resume ledger: how every stage that writes rows (label, classify) keeps them.

``PartTable`` (``table.py``): atomic part writes, part naming, the newest-part rule, repair.
``ResumeLedger`` (``ledger.py``): what a re-run skips, which identical images are copied, partitioned
over Ray actors so that no process holds the whole collection.
"""

from near_ray.parts.ledger import LedgerLostError, LedgerPartition, ResumeLedger, lost_partition
from near_ray.parts.table import PartTable, ResumeRule, best_rows, domain_of, part_name

__all__ = ["LedgerLostError", "LedgerPartition", "lost_partition", "PartTable", "ResumeLedger", "ResumeRule", "best_rows", "domain_of", "part_name"]
