"""Operations, the top layer: the `bgqueue` command (`cli`), the demo, `bgqueue status`,
Flower with bgqueue's Pending page (`flower`, `backlog/`) and the loader of app modules.
Nothing in bgqueue imports it."""
