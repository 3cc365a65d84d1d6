"""Adapter listing and the admin routes that upload and delete adapters."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile

from service.api.auth import require_admin
from service.api.schemas import AdapterEntry, AdapterList, error_responses
from service.api.state import AppState, Inference, State
from service.domain import AdapterInfo
from service.errors import UploadTooLarge
from service.inference import InferenceService
from service.model.validation import check_adapter, check_tokenizer
from service.store.archive import ArchiveLimits
from service.store.uploads import install_upload

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=error_responses(401, 404, 422, 500, 503))
_ADMIN_ERRORS = error_responses(403, 409, 413)


def _entry(info: AdapterInfo, inference: InferenceService) -> AdapterEntry:
    failure = inference.quarantine.failure(info)
    return AdapterEntry.of(info, info.name in inference.resident, None if failure is None else failure.reason,
                           inference.requests_served(info.name))


@router.get("", response_model=AdapterList)
async def list_adapters(inference: Inference) -> AdapterList:
    infos = await asyncio.to_thread(inference.store.list)
    return AdapterList(adapters=[_entry(info, inference) for info in infos])


@router.get("/{name}", response_model=AdapterEntry)
async def get_adapter(name: str, inference: Inference) -> AdapterEntry:
    info = await asyncio.to_thread(inference.store.get, name)
    return _entry(info, inference)


async def _install(
    request: Request, state: AppState, inference: InferenceService, name: str, archive: UploadFile, replace: bool
) -> tuple[AdapterEntry, bool]:
    request.state.adapter = name
    settings = state.settings
    size = archive.size if archive.size is not None else 0
    if size > settings.max_upload_bytes:
        raise UploadTooLarge(f"the archive is {size} bytes; the limit is {settings.max_upload_bytes}")
    limits = ArchiveLimits(max_unpacked_bytes=settings.max_unpacked_bytes)

    def check(info: AdapterInfo) -> None:
        check_adapter(info, state.shapes, settings.max_lora_rank, settings.max_virtual_tokens,
                      settings.max_adapter_tensors)
        check_tokenizer(info, inference.runner.base.tokenizer)
        inference.smoke(info)  # it must run once on the real model before anyone can ask for it

    info, replaced = await asyncio.to_thread(
        install_upload, inference.store, name, archive.file, size, limits, check, replace
    )
    inference.quarantine.forget(name)  # it just ran once on the model: a quarantined name starts clean
    return AdapterEntry.of(info, loaded=False, requests=inference.requests_served(name)), replaced


@router.post("", status_code=201, response_model=AdapterEntry, dependencies=[Depends(require_admin)],
             responses=_ADMIN_ERRORS)
async def upload_adapter(
    request: Request,
    state: State,
    inference: Inference,
    name: str = Form(description="The new adapter's name."),
    archive: UploadFile = File(description="A .zip or .tar.gz of the adapter's files, at its top or in one folder."),
) -> AdapterEntry:
    """Add an adapter; 409 when the name exists."""
    entry, _ = await _install(request, state, inference, name, archive, replace=False)
    return entry


@router.put("/{name}", response_model=AdapterEntry, dependencies=[Depends(require_admin)],
            responses={201: {"model": AdapterEntry, "description": "Created (the name was free)."}, **_ADMIN_ERRORS})
async def replace_adapter(
    name: str,
    request: Request,
    response: Response,
    state: State,
    inference: Inference,
    archive: UploadFile = File(description="A .zip or .tar.gz of the new version's files."),
) -> AdapterEntry:
    """Publish a new version: requests already running finish on the old one, later ones get the new one."""
    entry, replaced = await _install(request, state, inference, name, archive, replace=True)
    response.status_code = 200 if replaced else 201
    return entry


@router.delete("/{name}", status_code=204, dependencies=[Depends(require_admin)], responses=_ADMIN_ERRORS)
async def delete_adapter(name: str, request: Request, inference: Inference) -> Response:
    request.state.adapter = name
    await asyncio.to_thread(inference.store.delete, name)
    await inference.forget(name)
    return Response(status_code=204)
