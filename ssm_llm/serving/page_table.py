"""The host side of the page pool: which pages are free, who holds each page, and the prefix cache.

A full page is keyed by the whole token prefix it ends (its parent page's key and its own tokens), so two
requests whose prompts start alike share the pages of that prefix, by reference count. A page nobody holds
any more stays cached (least recently released first out) until its space is needed.
"""

from __future__ import annotations

from collections import OrderedDict


class PageTable:
    """Page ids 0..num_pages-1: free, held (reference-counted), or cached (unheld but reusable by prefix)."""

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages
        self._key_of: dict[int, tuple] = {}  # page -> its prefix key (full, registered pages)
        self._page_of: dict[tuple, int] = {}  # prefix key -> page
        self._cached: OrderedDict[int, None] = OrderedDict()  # unheld registered pages, oldest first

    @property
    def available(self) -> int:
        """Pages that can be handed out now (free, or cached and evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def used(self) -> int:
        """Pages held by at least one request."""
        return self.num_pages - self.available

    def allocate(self) -> int | None:
        """A page for one holder (a free one, else the oldest cached one, forgotten), or None if none is left."""
        if self._free:
            page = self._free.pop()
        elif self._cached:
            page, _ = self._cached.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
        else:
            return None
        self._refs[page] = 1
        return page

    def release(self, pages: list[int]) -> None:
        """Drop one reference to each page; an unheld page becomes free, or cached if it is registered."""
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._cached[page] = None
                else:
                    self._free.append(page)

    def match(self, tokens: list[int], limit: int) -> tuple[list[int], tuple | None]:
        """The cached pages holding the longest full-page prefix of `tokens` within its first `limit` tokens,
        each now held once more; and the key of the last one (None when nothing matched)."""
        pages, key = [], None
        if not self.prefix_caching:
            return pages, key
        size = self.page_size
        for start in range(0, limit - size + 1, size):
            candidate = (key, tuple(tokens[start : start + size]))
            page = self._page_of.get(candidate)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._cached[page]
            self._refs[page] += 1
            pages.append(page)
            key = candidate
        return pages, key

    def register(self, page: int, parent: tuple | None, tokens: list[int]) -> tuple:
        """Record that `page` (full) holds `tokens` after the prefix `parent`; returns its key. If another page
        already holds that prefix, `page` stays private (both hold the same values)."""
        key = (parent, tuple(tokens))
        if self.prefix_caching and key not in self._page_of and page not in self._key_of:
            self._page_of[key] = page
            self._key_of[page] = key
        return key
