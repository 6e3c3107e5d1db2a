"""Which served bundle (and which domain inside it) answers a request's ``domain``: one rule for the
ingress and the model replicas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class RouteError(LookupError):
    """``code``: "domain_required" (several bundles, no domain given) or "unknown_domain"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Routes:
    table: dict[str, tuple[int, str | None]]  # public domain -> (bundle index, domain inside the bundle)
    bundles: int

    def route(self, domain: str | None) -> tuple[int, str | None]:
        if domain is None:
            if self.bundles == 1:
                return 0, None
            raise RouteError("domain_required", f"several bundles are served: pass a domain, one of {sorted(self.table)}")
        if domain not in self.table:
            raise RouteError("unknown_domain", f"unknown domain '{domain}': this server serves {sorted(self.table)}")
        return self.table[domain]

    def to_json(self) -> dict[str, Any]:
        return {"bundles": self.bundles, "table": {d: {"bundle": i, "domain": inner} for d, (i, inner) in self.table.items()}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Routes:
        return cls({d: (int(r["bundle"]), r["domain"]) for d, r in obj["table"].items()}, int(obj["bundles"]))
