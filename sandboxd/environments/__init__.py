"""Python environments: built by pip in the build jail, taken over, served through the jail's stacks.

    service    which environments there are, their builds, what serves (``Environments``)
    takeover   a build's directory made root's and checked, its distributions read
"""

from .service import Environments, site_of

__all__ = ["Environments", "site_of"]
