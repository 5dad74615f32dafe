"""Every request of a batch file, held compactly while the job runs.

Per request: its line, custom_id (UTF-8 in one byte array), request hash (8 bytes) and record key
(16 bytes, ``io.results.record_key``), its url, echo and max-tokens-given flags, and which
distinct ``SamplingParams`` and chat ``ReplyFormat`` it uses (each distinct one is kept once);
a ``/v1/responses`` request's ``ResponseEcho``: its settings once per distinct value, its own
fields (metadata, user) as UTF-8 in one byte array;
the token ids of the requests to run go into one ``TokenArrays``. About 60 bytes a request
beside its tokens, against kilobytes as parsed objects. ``runnable()`` hands the engine the
requests to run as a ``CompactRequests`` (a ``Request`` object is made only when the engine
schedules it); ``info()`` rebuilds what an output record needs.
"""

from __future__ import annotations

from array import array

import numpy as np

from ..chat.render import ReplyFormat
from ..io.batch_file import CHAT_URL, COMPLETIONS_URL, RESPONSES_URL, BatchRequest
from ..io.embedding_request import EMBEDDINGS_URL
from ..io.responses_request import ResponseEcho
from ..io.score_request import RERANK_URL, SCORE_URL
from ..planning.token_arrays import TokenArraysBuilder
from ..sampling_params import SamplingParams
from ..scheduling.request_source import CompactRequests

# flags: chat url, echo, max_tokens set in the body, responses url, embeddings url, score
# url, rerank url
_CHAT, _ECHO, _GIVEN, _RESPONSES, _EMBED, _SCORE, _RERANK = 1, 2, 4, 8, 16, 32, 64
_URL_FLAGS = {
    CHAT_URL: _CHAT, RESPONSES_URL: _RESPONSES, EMBEDDINGS_URL: _EMBED, SCORE_URL: _SCORE,
    RERANK_URL: _RERANK,
}  # fmt: skip


class BatchStore:
    """Append requests in input order with ``add``, then ``freeze`` once."""

    def __init__(self) -> None:
        self._lines = array("q")
        self._rows = array("q")  # the request's prompt in ``tokens``, or -1 (not to run)
        self._flags = array("B")
        self._param_ids = array("i")
        self._sets: dict[SamplingParams, int] = {}
        self._reply_ids = array("i")  # -1: none
        self._replies: dict[ReplyFormat, int] = {}
        self._hashes = bytearray()  # 8 bytes each
        self._keys = bytearray()  # 16 bytes each
        self._names = bytearray()  # custom_ids, UTF-8
        self._name_ends = array("q")
        self._texts: dict[int, str] = {}  # echoed text prompts, returned documents, by request
        self._settings: dict[str, int] = {}  # ResponseEcho.settings
        self._setting_ids = array("i")  # -1: not a responses request
        self._own = bytearray()  # ResponseEcho.own, UTF-8
        self._own_ends = array("q")
        self._tokens = TokenArraysBuilder()
        self.frozen = False

    def __len__(self) -> int:
        return len(self._lines)

    def add(self, req: BatchRequest, key: bytes, ids: np.ndarray | None) -> None:
        """Record ``req`` (``key``: its ``record_key``); ``ids`` are its prompt's token ids
        when it is to run."""
        i = len(self._lines)
        self._lines.append(req.line)
        if ids is None:
            self._rows.append(-1)
        else:
            self._rows.append(len(self._tokens))
            self._tokens.append(ids)
        self._flags.append(
            _URL_FLAGS.get(req.url, 0)
            | (_ECHO if req.echo else 0)
            | (_GIVEN if req.max_tokens_given else 0)
        )
        self._param_ids.append(self._sets.setdefault(req.params, len(self._sets)))
        reply = -1 if req.reply is None else self._replies.setdefault(req.reply, len(self._replies))
        self._reply_ids.append(reply)
        self._hashes += bytes.fromhex(req.request_hash)
        self._keys += key
        self._names += req.custom_id.encode()
        self._name_ends.append(len(self._names))
        if req.echo and isinstance(req.prompt, str):
            self._texts[i] = req.prompt
        score = req.params.score
        if req.url == RERANK_URL and req.pair is not None and score and score.return_documents:
            self._texts[i] = req.pair[1]
        echo = req.response_echo
        settings = (
            -1 if echo is None else self._settings.setdefault(echo.settings, len(self._settings))
        )
        self._setting_ids.append(settings)
        self._own += b"" if echo is None else echo.own.encode()
        self._own_ends.append(len(self._own))

    def freeze(self) -> None:
        """Turn the appended columns into arrays (no copies of the large ones)."""
        self.lines = np.frombuffer(self._lines, dtype=np.int64)
        self.rows = np.frombuffer(self._rows, dtype=np.int64)
        self.param_ids = np.frombuffer(self._param_ids, dtype=np.int32)
        self.keys = np.frombuffer(self._keys, dtype="S16")
        self.explicit = np.frombuffer(self._flags, dtype=np.uint8) & _GIVEN > 0
        self.prompts = self._tokens.build()
        self.param_sets = tuple(self._sets)
        self.replies = tuple(self._replies)
        self.settings = tuple(self._settings)
        self.frozen = True

    def runnable(self) -> CompactRequests:
        """The requests with token ids, as the engine takes them: request id = the request's
        index in the store."""
        entries = np.flatnonzero(self.rows >= 0)
        return CompactRequests(
            self.prompts.select(self.rows[entries]),
            self.param_sets,
            self.param_ids[entries],
            entries,
        )

    def info(self, i: int) -> BatchRequest:
        """Request ``i`` as its output record needs it (no messages: they were tokenized; an
        embedding line's inputs and a score line's pairs are requests of their own, of
        consecutive indices: its ``part`` and ``parts`` say which; a rerank pair's ``prompt``
        is its document when the record returns it)."""
        start = self._name_ends[i - 1] if i else 0
        flags = self._flags[i]
        line = self._lines[i]
        first, end = (int(x) for x in np.searchsorted(self.lines, [line, line + 1]))
        url = next((u for u, f in _URL_FLAGS.items() if flags & f), COMPLETIONS_URL)
        echo = None
        if self._setting_ids[i] >= 0:
            own = self._own[self._own_ends[i - 1] if i else 0 : self._own_ends[i]].decode()
            echo = ResponseEcho(self.settings[self._setting_ids[i]], own)
        return BatchRequest(
            line=line,
            custom_id=self._names[start : self._name_ends[i]].decode(),
            url=url,
            messages=None,
            prompt=self._texts.get(i),
            params=self.param_sets[self._param_ids[i]],
            request_hash=self._hashes[8 * i : 8 * i + 8].hex(),
            echo=bool(flags & _ECHO),
            max_tokens_given=bool(flags & _GIVEN),
            reply=self.replies[self._reply_ids[i]] if self._reply_ids[i] >= 0 else None,
            response_echo=echo,
            part=i - first,
            parts=end - first,
        )
