// The screens' state. Every engine call runs on Dispatchers.Default through
// DemoController (plain Kotlin, compiled and run in CI by scripts/kotlin.sh);
// this file only moves results into Compose state.
package org.nextquill.demo

import android.app.Application
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.setValue
import androidx.lifecycle.AndroidViewModel
import androidx.lifecycle.viewModelScope
import java.io.File
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import org.nextquill.HistoryItem
import org.nextquill.NextquillException
import org.nextquill.TrainOptions
import org.nextquill.TrainOutcome
import org.nextquill.UserSummary
import org.nextquill.demo.core.DemoController
import org.nextquill.demo.core.Heatmap
import org.nextquill.demo.core.TrainingProgress

const val MODEL_ASSET = "SmolLM2-135M-Instruct.Q4_1.gguf"
const val USERS_ASSET = "demo_users.jsonl"
const val DEMO_REQUEST =
    "Category: Kitchen\nProduct: Electric kettle 1.7 litre\nRating: 5/5\nReview title: Boils fast"

class DemoViewModel(app: Application) : AndroidViewModel(app) {
    private var demo: DemoController? = null

    var status by mutableStateOf("Loading the model…")
    var users by mutableStateOf(emptyList<UserSummary>())
    var selectedUser by mutableStateOf<String?>(null)
    var history by mutableStateOf(emptyList<HistoryItem>())
    var heatmap by mutableStateOf<Heatmap?>(null)
    var training by mutableStateOf<TrainingProgress?>(null)
    var isTraining by mutableStateOf(false)
    var genericText by mutableStateOf("")
    var personalText by mutableStateOf("")

    init {
        viewModelScope.launch {
            runCatchingEngine {
                val opened = withContext(Dispatchers.IO) {
                    val model = copyAsset(MODEL_ASSET)
                    val db = File(getApplication<Application>().filesDir, "history.sqlite3")
                    DemoController.open(db.path, model.path).also { controller ->
                        val jsonl = getApplication<Application>().assets.open(USERS_ASSET)
                            .bufferedReader().readText()
                        controller.seedIfEmpty(jsonl)
                    }
                }
                demo = opened
                users = withContext(Dispatchers.Default) { opened.users() }
                status = "Pick a user"
            }
        }
    }

    fun select(userId: String) = launchEngine {
        selectedUser = userId
        heatmap = null
        genericText = ""
        personalText = ""
        history = withContext(Dispatchers.Default) { it.history(userId) }
        status = "${history.size} texts by $userId"
    }

    fun explain(item: HistoryItem) = launchEngine {
        status = "Measuring what ${item.userId}'s history causes…"
        heatmap = withContext(Dispatchers.Default) { it.heatmap(item.userId, item.itemId) }
        status = "%.0f%% of tokens carry ${item.userId}'s preference".format(
            100 * (heatmap?.preferenceBearingShare ?: 0f),
        )
    }

    fun personalize() = launchEngine { demo ->
        val user = selectedUser ?: return@launchEngine
        isTraining = true
        training = null
        val result = withContext(Dispatchers.Default) {
            demo.personalize(user, TrainOptions(epochs = 2u, learningRate = 1e-3, warmupSteps = 2u)) {
                progress -> viewModelScope.launch(Dispatchers.Main) { training = progress }
            }
        }
        isTraining = false
        status = when (result.outcome) {
            TrainOutcome.ACTIVATED -> "Personalized in ${result.steps} steps"
            TrainOutcome.REJECTED -> "The new adapter failed its check; the previous one stays"
            TrainOutcome.STOPPED -> "Cancelled; the previous adapter stays active"
        }
    }

    /** The cancel button: safe from the UI thread while training runs on another. */
    fun cancel() {
        demo?.cancelTraining()
    }

    fun compare() = launchEngine { demo ->
        val user = selectedUser ?: return@launchEngine
        genericText = ""
        personalText = ""
        status = "Writing…"
        withContext(Dispatchers.Default) {
            demo.compare(
                user, DEMO_REQUEST,
                onGeneric = { piece -> viewModelScope.launch(Dispatchers.Main) { genericText += piece } },
                onPersonalized = { piece -> viewModelScope.launch(Dispatchers.Main) { personalText += piece } },
            )
        }
        status = "Generic next to $user's"
    }

    private fun launchEngine(block: suspend (DemoController) -> Unit) {
        val controller = demo ?: return
        viewModelScope.launch { runCatchingEngine { block(controller) } }
    }

    private suspend fun runCatchingEngine(block: suspend () -> Unit) {
        try {
            block()
        } catch (e: NextquillException) {
            // Every engine error is typed; its message says what to do.
            isTraining = false
            status = "${e::class.simpleName}: ${e.message}"
        }
    }

    /** llama.cpp opens files by path: copy the model out of the APK once. */
    private fun copyAsset(name: String): File {
        val target = File(getApplication<Application>().filesDir, name)
        if (!target.exists()) {
            val partial = File(target.path + ".partial")
            getApplication<Application>().assets.open(name).use { input ->
                partial.outputStream().use { input.copyTo(it) }
            }
            partial.renameTo(target)
        }
        return target
    }

    override fun onCleared() {
        demo?.close()
    }
}
