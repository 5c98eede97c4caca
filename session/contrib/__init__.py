"""Framework adapters: thin classes that map a framework's vocabulary onto `SessionStore`.

Each submodule imports its framework (install the extra of the same name);
`import session` imports none of them.

- `session.contrib.django`: a Django session engine.
- `session.contrib.openai_agents`: an OpenAI Agents SDK session.
- `session.contrib.langchain`: a LangChain chat message history.
"""
