"""Names for ids: people (kanji name, kana, department), doors, areas, terminals, keys and media.

Names come from the signed site policy. The version in force names most ids; a register reaches back
years, so an id no longer in it (someone who left, a retired door) is looked up in older versions, newest
first, before it is shown as its bare id. Ids stay on every reference (hover, exports).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, func, select

from sekisho.controller.reports.paging import Ref
from sekisho.controller.store.models import PolicyVersion
from sekisho.controller.store.store import Store
from sekisho.protocol.policy import SitePolicy

_POLICY = cast(Table, PolicyVersion.__table__)


@dataclass(frozen=True, slots=True)
class PersonInfo:
    """What a register shows of a person."""

    id: str
    name: str
    kana: str | None
    department: str | None
    logins: tuple[str, ...]
    visitor: bool


@dataclass(frozen=True, slots=True)
class DoorInfo:
    """What a register shows of a door, locker or key cabinet."""

    id: str
    name: str
    kind: str
    agent: str
    area: str | None


@dataclass
class Directory:
    """The names of one policy version, with older versions consulted lazily for ids it lacks."""

    version: int | None
    people: dict[str, PersonInfo] = field(default_factory=dict)
    doors: dict[str, DoorInfo] = field(default_factory=dict)
    areas: dict[str, tuple[str, str]] = field(default_factory=dict)
    terminals: dict[str, tuple[str, str]] = field(default_factory=dict)
    keys: dict[tuple[str, str], str] = field(default_factory=dict)
    media: dict[str, str] = field(default_factory=dict)
    site_name: str = ""
    _older: list[int] = field(default_factory=list)
    _store: Store | None = None

    @classmethod
    def load(cls, store: Store) -> Directory:
        """Read the names of the policy version in force (empty without one)."""
        with store.engine.connect() as conn:
            versions = [
                int(v) for v in conn.execute(select(_POLICY.c.version).order_by(_POLICY.c.version.desc())).scalars()
            ]
            if not versions:
                return cls(None, _store=store)
            document = conn.execute(select(_POLICY.c.document).where(_POLICY.c.version == versions[0])).scalar_one()
        directory = cls(versions[0], _older=versions[1:], _store=store)
        directory._absorb(SitePolicy.model_validate(document), overwrite=True)
        return directory

    @staticmethod
    def newest_version(store: Store) -> int | None:
        """Return the newest policy version number (to know when a cached directory is stale)."""
        with store.engine.connect() as conn:
            found = conn.execute(select(func.max(_POLICY.c.version))).scalar()
        return None if found is None else int(found)

    def _absorb(self, policy: SitePolicy, *, overwrite: bool) -> None:
        def put(target: dict[Any, Any], key: Any, value: Any) -> None:
            if overwrite or key not in target:
                target[key] = value

        if overwrite:
            self.site_name = policy.site.name
        for p in policy.people:
            info = PersonInfo(p.id, p.name, p.kana, p.department, tuple(p.logins), "visitor" in p.roles)
            put(self.people, p.id, info)
        for d in policy.doors:
            put(self.doors, d.id, DoorInfo(d.id, d.name, d.kind, d.agent, d.area))
        for a in policy.areas:
            put(self.areas, a.id, (a.name, a.kind))
        for t in policy.terminals:
            put(self.terminals, t.id, (t.name, t.agent))
        for c in policy.key_cabinets:
            for s in c.slots:
                put(self.keys, (c.door, s.key), s.name)
        for m in policy.media:
            put(self.media, m.id, m.name)

    def _reach_back(self, present: Any) -> bool:
        """Absorb older versions until present() holds; tell whether it does."""
        while not present() and self._older and self._store is not None:
            version = self._older.pop(0)
            with self._store.engine.connect() as conn:
                document = conn.execute(select(_POLICY.c.document).where(_POLICY.c.version == version)).scalar_one()
            try:
                self._absorb(SitePolicy.model_validate(document), overwrite=False)
            except ValueError:
                continue  # a version an older release wrote and this one cannot read names nothing
        return bool(present())

    # --- lookups -----------------------------------------------------------------------------------

    def person_info(self, pid: str) -> PersonInfo | None:
        """Return what the policy says of a person, reaching back to older versions."""
        if pid not in self.people:
            self._reach_back(lambda: pid in self.people)
        return self.people.get(pid)

    def person(self, pid: str | None) -> Ref | None:
        """Return a person as kanji name + kana (their id when no version names them)."""
        if not pid:
            return None
        info = self.person_info(pid)
        if info is None:
            return Ref(pid, pid, None, known=False)
        return Ref(pid, info.name, info.kana)

    def door(self, door_id: str | None) -> Ref | None:
        """Return a door, locker or key cabinet by name."""
        if not door_id:
            return None
        if door_id not in self.doors:
            self._reach_back(lambda: door_id in self.doors)
        info = self.doors.get(door_id)
        return Ref(door_id, info.name) if info else Ref(door_id, door_id, known=False)

    def area(self, area_id: str | None) -> Ref | None:
        """Return an area (管理区域 / 取扱区域) by name."""
        if not area_id:
            return None
        if area_id not in self.areas:
            self._reach_back(lambda: area_id in self.areas)
        found = self.areas.get(area_id)
        return Ref(area_id, found[0]) if found else Ref(area_id, area_id, known=False)

    def terminal(self, terminal_id: str | None) -> Ref | None:
        """Return a terminal by name."""
        if not terminal_id:
            return None
        if terminal_id not in self.terminals:
            self._reach_back(lambda: terminal_id in self.terminals)
        found = self.terminals.get(terminal_id)
        return Ref(terminal_id, found[0]) if found else Ref(terminal_id, terminal_id, known=False)

    def key(self, cabinet: str, key_id: str) -> Ref:
        """Return a key by the name of its slot."""
        if (cabinet, key_id) not in self.keys:
            self._reach_back(lambda: (cabinet, key_id) in self.keys)
        name = self.keys.get((cabinet, key_id))
        return Ref(key_id, name) if name else Ref(key_id, key_id, known=False)

    def medium(self, medium_id: str | None) -> Ref | None:
        """Return a registered medium by name."""
        if not medium_id:
            return None
        if medium_id not in self.media:
            self._reach_back(lambda: medium_id in self.media)
        name = self.media.get(medium_id)
        return Ref(medium_id, name) if name else Ref(medium_id, medium_id, known=False)

    def agent_of_terminal(self, terminal_id: str) -> str | None:
        """Return the agent id of a terminal of the policy."""
        found = self.terminals.get(terminal_id)
        return found[1] if found else None

    def department_people(self, department: str) -> list[str]:
        """Return the ids of the people of a department (in the version in force)."""
        return sorted(p.id for p in self.people.values() if p.department == department)

    def logins_of(self, people: list[str]) -> list[str]:
        """Return the OS login names of these people."""
        return sorted({name for pid in people if (info := self.people.get(pid)) for name in info.logins})

    def person_of_login(self, login: str | None) -> str | None:
        """Return whose OS login name this is."""
        if not login:
            return None
        return next((p.id for p in self.people.values() if login in p.logins), None)

    def describe_person(self, pid: str) -> str:
        """Return a person as text for a filter line: name (kana) [department]."""
        ref = self.person(pid)
        info = self.people.get(pid)
        text = ref.text() if ref else pid
        return f"{text} [{info.department}]" if info and info.department else text
