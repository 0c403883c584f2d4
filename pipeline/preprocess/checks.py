"""What is checked, and when: inputs and output before anything is created (and before Ray starts), the cluster's
view of local paths right after Ray starts, and broken-environment failures after encoding, before any shard."""

from __future__ import annotations

import os

from pipeline import storage
from pipeline.preprocess.config import PreprocessError


class EnvironmentFailures(PreprocessError):
    """Too many images failed for reasons that point at the environment, not the data: stop before the shards."""

    exit_code = 1


def resolve_excludes(uris: list[str]) -> list[str]:
    """--exclude inputs resolved like --input ([] when none)."""
    try:
        return resolve_inputs(uris) if uris else []
    except PreprocessError as e:
        raise PreprocessError(f"--exclude: {e}") from None


def resolve_inputs(uris: list[str]) -> list[str]:
    """The --input URIs, normalized; each must exist."""
    from pipeline import sources

    try:
        inputs = [i.uri for i in sources.resolve_inputs([os.fspath(u) for u in uris])]
    except sources.InputError as e:
        raise PreprocessError(str(e)) from None
    missing = [u for u in inputs if not storage.exists(u)]
    if missing:
        raise PreprocessError(f"input {missing[0]} does not exist")
    return inputs


def check_inputs_hold_images(inputs: list[str], image_column: str | None) -> None:
    """Each input holds at least one image, tar or usable Parquet file: walks each until the first one (reads a
    Parquet footer only, never its pages), so a wrong --input or --image-column fails before OUTPUT is touched."""
    from pipeline import sources

    for inp in sources.resolve_inputs(inputs):
        try:
            sources.check_holds_images(inp, image_column)
        except sources.InputError as e:
            raise PreprocessError(str(e)) from None


def check_output_usable(output: str) -> None:
    """A local OUTPUT must be a folder we can create or write in (storage.folder_problem)."""
    problem = storage.folder_problem(output)
    if problem:
        raise PreprocessError(f"--output {output} {problem}: choose another --output")


def check_cluster_sees(inputs: list[str], output: str) -> None:
    """Refuse at once when a node of the Ray cluster cannot see a local input or OUTPUT (which may not exist yet:
    its nearest existing parent is probed). Called after Ray starts and before anything is written."""
    from pipeline.cluster import check_paths_visible

    check_paths_visible(inputs, output)


def check_environment_failures(images: int, failed: dict[str, int], examples: dict[str, list[str]],
                               max_fraction: float) -> None:
    """Stop when images failed for ENVIRONMENT_REASONS are more than max_fraction of all images."""
    from pipeline.stats import ENVIRONMENT_REASONS

    broken = {r: failed[r] for r in ENVIRONMENT_REASONS if failed.get(r)}
    total = sum(broken.values())
    if not images or total <= max_fraction * images:
        return
    top = max(broken, key=lambda r: (broken[r], r))
    example_id, example_message = examples.get(top, ["?", ""])
    raise EnvironmentFailures(
        f"{total:,} of {images:,} images ({total / images:.1%}) failed for reasons that point at the environment, "
        f"above --max-failed-fraction {max_fraction:g}: most are {top} ({broken[top]:,}), e.g. {example_id}: "
        f"{example_message}. Fix the environment and rerun with --overwrite (or a new --output) to encode them "
        "again, or rerun the same command with a higher --max-failed-fraction to accept them (nothing is "
        "re-encoded)")
