"""Exports of the predictions table (or the labels table) to the tools people browse and review images in.

``near-ray export --format imagefolder|labelstudio|fiftyone --out URI`` writes, per domain:

- **imagefolder**: ``<out>/<domain>/<name>/<file>`` (torchvision's ``ImageFolder``, Hugging Face's
  ``imagefolder``), images without a name under ``<out>/_abstained/<domain>/``;
- **labelstudio**: ``<out>/<domain>/tasks.json`` (tasks with the answers as pre-annotations) and
  ``<out>/<domain>/labeling_config.xml`` (the names as choices); ``reviewed_names`` and
  ``edits_from_label_studio`` read a reviewed project's JSON export back;
- **fiftyone**: ``<out>/<domain>/labels.json`` and ``data/`` (``fo.types.FiftyOneImageClassificationDataset``,
  the score as the classification's confidence).

Local images are linked (``--copy`` copies them), images on S3 are copied; ``<out>/export.json`` records
what was written. Nothing here needs a truth table.
"""

from near_ray.export.labelstudio import edits_from_label_studio, labeling_config, reviewed_names
from near_ray.export.rows import SOURCES, ExportError, export_rows
from near_ray.export.stage import FORMATS, run_export

__all__ = [
    "FORMATS",
    "SOURCES",
    "ExportError",
    "edits_from_label_studio",
    "export_rows",
    "labeling_config",
    "reviewed_names",
    "run_export",
]
