"""Chat requests beyond plain text: tools and tool choice, the chat template's capabilities,
tool-call and reasoning parsers, and the assistant message built from an answer's text."""
