"""Users and access: password hashing, users and roles, the append-only access audit, reviewed marks.

Used by the web console (``gateway.console``) and the ``psg-gateway users`` / ``audit`` commands; the
tables are in ``gateway.store.models`` (migration 0005). See docs/admin-guide.md, "Users and access".
"""

from .audit import AccessAudit, AuditRow
from .passwords import hash_password, needs_rehash, verify_password
from .reviews import Review, ReviewError, Reviews
from .users import ROLES, User, UserError, UserStore, role_allows

__all__ = ["ROLES", "AccessAudit", "AuditRow", "Review", "ReviewError", "Reviews", "User", "UserError",
           "UserStore", "hash_password", "needs_rehash", "role_allows", "verify_password"]
