"""Who may call what: the caller's identity and one rule per RPC (pure: no gRPC objects beyond the
peer strings and certificate names `identify` is given).

Identities: a Unix-socket caller is `uid:<n>` (SO_PEERCRED, read by `peercred.UnixFront`); a caller with
the sidecar's own uid or root is operator-equivalent, because it can read the pools and state files
anyway. A TLS caller is each name of its certificate (CN and SAN entries); it is the operator when one
of them is an operator identity, a peer sidecar when one is a peer identity, and refused everything
unless one of them is allowed at all (`--tls-allow-client`). A TCP caller without a certificate is
trusted as the operator only when the sidecar was told so (`--insecure`, `--tls-no-client-auth`).

A group belongs to the identity whose Attach created it (`Group.creator`); a group with no recorded
creator (restored from an older state file, or received without one) is claimed by its next Attach.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
from collections.abc import Iterable

from ghostserve.sidecar import errors


class Rule(enum.Enum):
    ANY = "any"  # anyone who may call at all
    GROUP = "group"  # the group's owner or the operator
    REBUILD = "rebuild"  # GROUP while a rank of the group is invalid, else OPERATOR
    FLUSH = "flush"  # GROUP for one group, ANY for all
    OPERATOR = "operator"
    PEER = "peer"  # the operator or another sidecar


RULES: dict[str, Rule] = {
    "Attach": Rule.GROUP,
    "Detach": Rule.GROUP,
    "CommitChunk": Rule.GROUP,
    "CommitChunks": Rule.GROUP,
    "RecordTokens": Rule.GROUP,
    "ReleaseRequest": Rule.GROUP,
    "DescribeGroup": Rule.GROUP,
    "DescribeRequest": Rule.GROUP,
    "PlanRecovery": Rule.GROUP,
    "Rebuild": Rule.REBUILD,
    "Flush": Rule.FLUSH,
    "ListGroups": Rule.ANY,
    "GetStats": Rule.ANY,
    "WatchHealth": Rule.ANY,
    "MarkLost": Rule.OPERATOR,
    "InjectFault": Rule.OPERATOR,
    "DeleteGroup": Rule.OPERATOR,
    "MoveGroup": Rule.OPERATOR,
    "StreamRebuild": Rule.PEER,
    "ReceiveGroup": Rule.PEER,
}


@dataclasses.dataclass(frozen=True)
class Caller:
    names: tuple[str, ...]
    operator: bool = False
    peer: bool = False
    allowed: bool = True  # False: a certificate of the CA that names nobody we know

    @property
    def name(self) -> str:
        """The identity recorded as a group's creator."""
        return self.names[0] if self.names else "anonymous"


# The caller of the RPC being served (set by `rpc` around each handler).
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("ghostserve_sidecar_caller")


@dataclasses.dataclass(frozen=True)
class Policy:
    own_uid: int
    operator_names: frozenset[str] = frozenset({"ghostserve-operator"})
    peer_names: frozenset[str] = frozenset({"ghostserve-sidecar"})
    allowed_clients: frozenset[str] = frozenset()
    trust_anonymous_tcp: bool = False  # --insecure / --tls-no-client-auth

    def unix(self, uid: int | None) -> Caller:
        """A caller on the Unix socket (uid None: not relayed by our front, e.g. a test's inner
        connection: nobody)."""
        if uid is None:
            return Caller((), allowed=False)
        name = f"uid:{uid}"
        operator = uid in (self.own_uid, 0) or name in self.operator_names
        return Caller((name,), operator=operator, peer=name in self.peer_names)

    def tcp(self, cert_names: Iterable[str] | None) -> Caller:
        """A caller on TCP with the names of its verified certificate (None: no certificate)."""
        if cert_names is None:
            return Caller(
                ("tcp:anonymous",), operator=self.trust_anonymous_tcp, allowed=self.trust_anonymous_tcp
            )
        names = tuple(dict.fromkeys(n for n in cert_names if n))
        operator = any(n in self.operator_names for n in names)
        peer = any(n in self.peer_names for n in names)
        allowed = operator or peer or any(n in self.allowed_clients for n in names)
        return Caller(names, operator=operator, peer=peer, allowed=allowed)


def check(rule: Rule, caller: Caller, *, creator: str | None, healthy: bool, method: str) -> None:
    """Raise PermissionDenied unless `caller` may call `method` under `rule`. `creator` is the group's
    creator (None: no such group, or no group named), `healthy` whether all its ranks are valid."""
    if not caller.allowed:
        raise errors.PermissionDenied(f"{caller.name} may not call this sidecar")
    if caller.operator or rule is Rule.ANY:
        return
    if rule is Rule.PEER and caller.peer:
        return
    if rule is Rule.REBUILD and (healthy and creator is not None):
        raise errors.PermissionDenied(f"{method} of a group whose ranks are all valid is for the operator")
    if rule in (Rule.GROUP, Rule.REBUILD, Rule.FLUSH):
        if creator is None or creator == "" or creator in caller.names:
            return
        raise errors.PermissionDenied(f"{caller.name} does not own this group")
    raise errors.PermissionDenied(f"{method} is for the operator")


def may_see(caller: Caller, creator: str) -> bool:
    """Whether ListGroups shows a group to `caller`."""
    return caller.operator or creator == "" or creator in caller.names
