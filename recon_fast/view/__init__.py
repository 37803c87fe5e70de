"""The HTML viewer: one self-contained page (no network when opened) for an ActivityCube, two
cubes compared, or a direct-logit-attribution document. `recon-fast view` (which reads the files:
recon_fast.cli.view) and ActivityCube.to_html / _repr_html_ call into it with plain data; html.py
builds the page, assets/ holds its JS and CSS."""

from recon_fast.view.html import attribution_html, check_comparable, cube_fragment, cube_html, is_attribution

__all__ = ["attribution_html", "check_comparable", "cube_fragment", "cube_html", "is_attribution"]
