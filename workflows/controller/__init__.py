"""The rollout controller: WorkflowExecutor, AsyncTaskRunner, StalenessManager and failure accounting."""
