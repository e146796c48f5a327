"""Deleting a task at its owner's request (``DELETE /v1/tasks/{id}``): its objects in storage first,
then everything the store keeps of it (``JobStore.delete``). If storage fails, nothing of the record is
gone and the client can ask again; objects are never left without the record that names them, except
for the moment between the two steps."""

from __future__ import annotations

from services.errors import InvalidTransition
from services.storage import Storage
from services.store import JobStore, TaskStatus


def delete_task(store: JobStore, storage: Storage, task_id: str, *, tenant: str) -> None:
    """Delete a final task of ``tenant`` (404 for another's; 409 if it is not final)."""
    task = store.get(task_id, tenant=tenant)
    if not TaskStatus(task["status"]).is_final:
        raise InvalidTransition(f"a {task['status']} task cannot be deleted; cancel it first")
    storage.delete_task_objects(task_id)
    store.delete(task_id, tenant=tenant)
