"""Where a run's images are (``data``: its collections, one domain each) and where its artifacts go (``storage``)."""

from __future__ import annotations

import posixpath
from typing import Literal

from pydantic import Field, field_validator, model_validator

from near_ray.config.base import Section


# --------------------------------------------------------------------------------------------- storage
class StorageConfig(Section):
    """Where artifacts live and how to reach object storage.

    Credentials are never stored in a config: boto3/pyarrow read the standard AWS environment
    variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE).
    """

    workdir: str = Field("near_ray_run", description="s3://bucket/prefix or a local folder: every stage writes "
                         "below it")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto); else AWS_ENDPOINT_URL or AWS")
    region: str | None = Field(None, description="the S3 region; else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1")


# --------------------------------------------------------------------------------------------- data
class DomainConfig(Section):
    """One image collection to name: where its images are and what kind of thing they show."""

    name: str = Field(description="the domain's name (in errors, tables and bundles)")
    uri: str = Field(description="prefix holding the domain's images (s3://… or local)")
    meta_class: str | None = Field(None, description='"bird", "flower": named in the prompt when known')
    truth: str | None = Field(
        None, description="optional ground-truth table (parquet: path/uri, species) for evaluation")
    manifest: str | None = Field(
        None, description='parquet/CSV with a "uri" column: label exactly these images instead of listing uri')
    layout: str | None = Field(
        None, description="a dataset in its native layout below uri (cub200, stanford_cars, stanford_dogs, flowers102, "
        "oxford_pets; folder: uri/[<split>/]<class>/<image>; auto: the one its files show): its images are the "
        "dataset's own list, and its class names are the truth table when truth is unset (evaluation only: the MLLM "
        "never sees them); null: every image below uri")
    split: Literal["train", "test", "val"] | None = Field(
        None, description="with a layout: only this split's images are named (the evaluation still reads the test "
        "split's truth); null: every image")

    @field_validator("layout")
    @classmethod
    def _known_layout(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from near_ray.data.readers import DatasetError, canonical_layout  # pandas: only where a layout is named

        try:
            return canonical_layout(v)
        except DatasetError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _layout_or_manifest(self) -> DomainConfig:
        if self.layout and self.manifest:
            raise ValueError(f"domain '{self.name}': a layout lists the dataset's images, a manifest lists its own: "
                             "set one of layout and manifest")
        if self.split and not self.layout:
            raise ValueError(f"domain '{self.name}': split needs a layout (the dataset whose split it is)")
        return self

    @property
    def has_truth(self) -> bool:
        """Whether the domain's classes are known: a truth table, or a dataset layout named as one that names them
        (``auto`` is not: an unlabeled folder of subfolders reads as ``folder``, and a run without labels must not
        turn into a benchmark run)."""
        return bool(self.truth) or self.layout not in (None, "unlabeled", "auto")


class DataConfig(Section):
    """The image collections of the run."""

    domains: list[DomainConfig] = Field(default_factory=list, description="the collections, one entry each")
    image_extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"],
        description="file endings listed as images",
    )
    max_images: int | None = Field(None, description="the discovery set's size: the images a run asks the MLLM "
                                   "about, chosen by label.select; null = all")

    @model_validator(mode="after")
    def _one_domain_per_image(self) -> DataConfig:
        """An image belongs to one domain (its prompt, vocabulary and neighbours): listed folders must not nest."""
        listed = [(d.name, (d.uri if d.uri.startswith("s3://") else posixpath.normpath(d.uri)).rstrip("/") + "/")
                  for d in self.domains if not d.manifest]  # fmt: skip
        for i, (a, ua) in enumerate(listed):
            for b, ub in listed[i + 1 :]:
                if ua.startswith(ub) or ub.startswith(ua):
                    raise ValueError(f"domains '{a}' and '{b}' list overlapping folders ({ua} and {ub}): each image "
                                     "must belong to one domain (give each its own folder, or a manifest of its images)")
        return self
