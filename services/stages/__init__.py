"""The pipeline stages, one module per role (services/model/plan.py's ROLES): `ROLE.py` holds `RoleStage`."""

from __future__ import annotations

from importlib import import_module

from detstream.services.model.plan import ROLES


def stage_class(role: str) -> type:
    """The Stage subclass of a role; LookupError for a name not in ROLES."""
    if role not in ROLES:
        raise LookupError(f"unknown role {role!r}; the roles: {', '.join(ROLES)}")
    return getattr(import_module(f"{__name__}.{role}"), f"{role.title()}Stage")
