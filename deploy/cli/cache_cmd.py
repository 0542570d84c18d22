"""`deploy cache show | clear`."""
from __future__ import annotations

import typer

from deploy.cli.app import cache_app, console, emit_json


@cache_app.command("clear")
def cache_clear(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Empty the cache folder (~/.cache/deploy, or $DEPLOY_CACHE_DIR)."""
    from deploy.core.cache import cache_dir, clear_cache

    files, size = clear_cache()
    if as_json:
        emit_json({"cache_dir": str(cache_dir()), "removed_files": files, "removed_bytes": size})
        return
    console.print(f"removed {files} files ({size / 1e6:.2f} MB) from {cache_dir()}", highlight=False, soft_wrap=True)


@cache_app.command("show")
def cache_show(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Where the cache is and what it holds."""
    from deploy.core.cache import cache_dir, cache_size

    files, size = cache_size()
    if as_json:
        emit_json({"cache_dir": str(cache_dir()), "files": files, "bytes": size})
        return
    console.print(f"{cache_dir()}: {files} files, {size / 1e6:.2f} MB", highlight=False, soft_wrap=True)
